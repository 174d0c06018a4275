"""Evaluation: metric modules against hand-computed fixtures, loaders on every real format, the
runner end to end with resume, likelihood ranking and two processes."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
from PIL import Image

from cvlm.build import build
from cvlm.eval import formats
from cvlm.eval.loaders import load_benchmark
from cvlm.eval.runner import MAPPING_FILE, METRICS_DIR, evaluate_model

RED, BLUE = Image.new("RGB", (40, 40), (220, 30, 30)), Image.new("RGB", (40, 40), (30, 60, 220))


def metric(name):
    return evaluate.load(str(METRICS_DIR / name))


# ---- metric modules: hand-computed fixtures -------------------------------------------------------------
def test_mme_acc_plus_differs_from_acc_and_every_parse_rule():
    mme = metric("mme")
    # OCR: image a both right; image b one right -> acc 3/4, acc+ 1/2 -> 125
    # count: "y" / "N" single letters; "Yes, two." and "nope" by the 4-character rule; "maybe" is other
    result = mme.compute(
        predictions=["Yes.", "no", "yes", "Yes", "y", "N", "Yes, two.", "nope", "maybe", "Not sure"],
        references=["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No", "Yes", "Yes"],
        question_id=["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"],
        category=["OCR"] * 4 + ["count"] * 4 + ["commonsense_reasoning"] * 2,
    )
    ocr, count, reasoning = (result["subtasks"][k] for k in ("OCR", "count", "commonsense_reasoning"))
    assert (ocr["acc"], ocr["acc_plus"], ocr["score"]) == (0.75, 0.5, 125.0)
    assert (count["acc"], count["acc_plus"], count["score"]) == (1.0, 1.0, 200.0)
    assert (reasoning["acc"], reasoning["score"]) == (0.0, 0.0)  # "maybe" is other; "Not sure" reads as no
    assert result["perception_score"] == 325.0 and result["cognition_score"] == 0.0
    assert result["other"] == 1 and result["other_ids"] == ["e"]


def test_mmbench_circular_eval_and_extraction_rules():
    mmbench = metric("mmbench")
    options = ["cat", "dog", "bird", "fish"]
    rotations = [options[s:] + options[:s] for s in range(4)]
    truth = ["A", "D", "C", "B"]  # "cat" after each shift
    # q7: right in 3 of 4 rotations -> circular wrong, single pass right
    preds7 = ["A", "(D)", "The answer is C.", "A"]
    # q8 (2 options): bare letter, then the option text inside the answer
    preds8, truth8 = ["B", "it is a red one"], ["B", "A"]
    rows = dict(
        predictions=preds7 + preds8 + ["A or B maybe"],
        references=truth + truth8 + ["A"],
        index=[7, 1_000_007, 2_000_007, 3_000_007, 8, 1_000_008, 9],
        category=["ocr"] * 4 + ["image_scene"] * 2 + ["ocr"],
        l2_category=["finegrained_perception (instance-level)"] * 4 + ["coarse_perception"] * 2
        + ["finegrained_perception (instance-level)"],
        choices=rotations + [["blue one", "red one"], ["red one", "blue one"]] + [["xylophone", "zebra"]],
    )
    result = mmbench.compute(**rows)
    assert result["num_questions"] == 3
    assert result["circular_accuracy"] == pytest.approx(1 / 3)  # only q8
    assert result["single_pass_accuracy"] == pytest.approx(2 / 3)  # q7 and q8
    assert result["per_category"]["ocr"] == {"circular": 0.0, "single_pass": 0.5, "num_questions": 2}
    assert result["per_l2_category"]["coarse_perception"]["circular"] == 1.0
    assert result["unparseable"] == 1 and result["unparseable_indices"] == [9]


def test_seed_bench_accuracy_per_dimension():
    seed = metric("seed_bench")
    result = seed.compute(predictions=["C ", "b. dog", "A", "D"], references=["C", "B", "B", "D"],
                          question_type_id=[1, 1, 5, 9])
    assert result["accuracy"] == 0.75
    assert result["per_dimension"] == {
        "Instances Counting": {"accuracy": 0.0, "num_questions": 1},
        "Scene Understanding": {"accuracy": 1.0, "num_questions": 2},
        "Text Understanding": {"accuracy": 1.0, "num_questions": 1},
    }


def test_granularity_macro_micro_and_mme_in_percent(tmp_path):
    granularity = metric("granularity")
    result = granularity.compute(benchmark=["mme", "mmbench", "mmbench", "seed_bench"],
                                 subtask=["OCR", "ocr", "image_scene", "Unknown Dim"], score=[150.0, 0.5, 0.9, 1.0],
                                 num_questions=[40, 10, 10, 5], mapping_file=str(MAPPING_FILE))
    assert result["fine"]["subtasks"] == {"mme/OCR": 75.0, "mmbench/ocr": 50.0}
    assert result["fine"]["macro"] == 62.5 and result["fine"]["micro"] == pytest.approx((75 * 40 + 50 * 10) / 50)
    assert result["coarse"]["macro"] == pytest.approx(90.0) and result["reasoning"]["macro"] is None
    assert result["unmapped"] == ["seed_bench/Unknown Dim"]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"mapping": {"mme": {"OCR": "reasoning"}}}))
    assert granularity.compute(benchmark=["mme"], subtask=["OCR"], score=[150.0], num_questions=[40],
                               mapping_file=str(mine))["reasoning"]["macro"] == 75.0


def test_the_mapping_file_covers_every_subtask_of_the_three_benchmarks():
    from cvlm.eval.loaders import MME_SUBTASKS

    mapping = json.loads(MAPPING_FILE.read_text())["mapping"]
    assert set(mapping["mme"]) == set(MME_SUBTASKS)
    assert len(mapping["mmbench"]) == 20 and len(mapping["seed_bench"]) == 9
    confirmed = json.loads(MAPPING_FILE.read_text())["confirmed"]["mmbench"]
    assert {mapping["mmbench"][k] for k in confirmed[:4]} == {"coarse"}


def test_the_granularity_modules_copy_of_the_granularities_is_the_packages():
    from cvlm.eval import GRANULARITIES
    from cvlm.eval.runner import metric_function

    assert metric_function(metric("granularity"), "GRANULARITIES") == GRANULARITIES == ("coarse", "fine", "reasoning")


# ---- loaders on every real format ---------------------------------------------------------------------------
MME_ITEMS = [
    {"subtask": "color", "name": "r1", "image": RED, "qa": [("Is the picture red? Please answer yes or no.", "Yes"),
                                                            ("Is the picture blue? Please answer yes or no.", "No")]},
    {"subtask": "scene", "name": "b1", "image": BLUE, "qa": [("Is this a blue scene? Please answer yes or no.", "Yes"),
                                                             ("Is this a red scene? Please answer yes or no.", "No")]},
]
MMB_ITEMS = [
    {"index": 0, "question": "What colour is the image?", "options": ["red", "blue", "green", "yellow"], "answer": "A",
     "category": "image_quality", "l2_category": "coarse_perception", "image": RED},
    {"index": 1, "question": "What colour is the image?", "hint": "Look closely.", "options": ["red", "blue"],
     "answer": "B", "category": "ocr", "l2_category": "finegrained_perception (instance-level)", "image": BLUE},
]
SEED_ITEMS = [
    {"question_id": 11, "question": "What colour is the image?", "choices": ["red", "blue", "green", "yellow"],
     "answer": "A", "question_type_id": 1, "image": RED},
    {"question_id": 12, "question": "What colour is the image?", "choices": ["red", "blue", "green", "yellow"],
     "answer": "B", "question_type_id": 3, "image": BLUE},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = {
        "mme-release": ("mme", formats.write_mme_release(root / "mme_release", MME_ITEMS)),
        "mme-side-by-side": ("mme", formats.write_mme_release(root / "mme_sbs", MME_ITEMS, layout="side_by_side")),
        "mme-parquet": ("mme", formats.write_mme_parquet(root / "mme_pq" / "test-00000.parquet", MME_ITEMS).parent),
        "mmbench-tsv": ("mmbench", formats.write_mmbench_tsv(root / "mmbench.tsv", MMB_ITEMS)),
        "mmbench-parquet": ("mmbench", formats.write_mmbench_parquet(root / "mmb_pq" / "dev.parquet", MMB_ITEMS).parent),
        "seed-json": ("seed_bench", formats.write_seed_json(root / "seed", SEED_ITEMS)),
        "seed-parquet": ("seed_bench", formats.write_seed_parquet(root / "seed_pq" / "test.parquet", SEED_ITEMS).parent),
    }
    return {k: (b, str(p)) for k, (b, p) in out.items()}


@pytest.mark.parametrize("name, expected", [("mme-release", 4), ("mme-side-by-side", 4), ("mme-parquet", 4),
                                            ("mmbench-tsv", 6), ("mmbench-parquet", 6), ("seed-json", 2),
                                            ("seed-parquet", 2)])
def test_each_real_format_round_trips_through_its_loader(files, name, expected):
    benchmark, path = files[name]
    image_folder = str(Path(path).parent / "images") if name == "seed-json" else None
    questions, problems = load_benchmark(benchmark, path, image_folder=image_folder)
    assert len(questions) == expected and problems == []
    first = questions[0]
    assert first.load_image().getpixel((5, 5))[0] > 150  # the red picture survived the format
    if benchmark == "mme":
        assert first.prompt == "Is the picture red?\nAnswer the question using a single word or phrase."
        assert first.fields == {"question_id": first.fields["question_id"], "category": "color"}
    elif benchmark == "mmbench":
        assert first.prompt == ("What colour is the image?\nA. red\nB. blue\nC. green\nD. yellow\n"
                                "Answer with the option's letter from the given choices directly.")
        assert questions[1].answer == "D" and questions[1].choices[3] == "red"  # shifted copy
        hinted = next(q for q in questions if q.fields["index"] == 1)
        assert hinted.prompt.startswith("Look closely.\nWhat colour") and hinted.choices == ["red", "blue"]
        assert hinted.fields["l2_category"] == "finegrained_perception (instance-level)"
    else:
        assert first.fields == {"question_type_id": 1} and first.choices == ["red", "blue", "green", "yellow"]


def test_unreadable_rows_are_reported_by_id_and_the_rest_kept(tmp_path):
    path = formats.write_mmbench_tsv(tmp_path / "m.tsv", MMB_ITEMS, circular=False)
    lines = path.read_text().splitlines()
    cells = lines[2].split("\t")
    cells[9] = "not-base64!!"
    path.write_text("\n".join([lines[0], lines[1], "\t".join(cells)]) + "\n")
    questions, problems = load_benchmark("mmbench", str(path))
    assert [q.id for q in questions] == ["0"]
    assert problems == ["1: the image is not valid base64 of an image file"]
    seed = formats.write_seed_json(tmp_path / "seed", SEED_ITEMS)
    (tmp_path / "seed" / "images" / "12.png").unlink()
    questions, problems = load_benchmark("seed_bench", str(seed), image_folder=str(tmp_path / "seed" / "images"))
    assert [q.id for q in questions] == ["11"] and problems[0].startswith("12: image ")


# ---- the runner end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build(tmp_path_factory.mktemp("model") / "tiny", vision="tiny-clip", llm="tiny-llama", connector="avgpool"))


@pytest.mark.parametrize("name", ["mme-release", "mme-parquet", "mmbench-tsv", "mmbench-parquet", "seed-json",
                                  "seed-parquet"])
def test_cvlm_eval_end_to_end_on_each_format(files, tiny, tmp_path, name):
    benchmark, path = files[name]
    image_folder = str(Path(path).parent / "images") if name == "seed-json" else None
    results = evaluate_model(tiny, benchmark, path, str(tmp_path / "out"), batch_size=3, max_new_tokens=4,
                             image_folder=image_folder)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["num_questions"] == results["num_questions"] > 0
    assert set(saved["granularity"]) == {"coarse", "fine", "reasoning", "unmapped"}
    assert saved["granularity"]["unmapped"] == []
    speed = saved["speed"]
    assert speed["visual_tokens_per_image"] == 4 and speed["mean_prefill_latency_s"] > 0
    assert speed["decode_tokens_per_s"] > 0 and speed["peak_memory_mb"] > 0
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == saved["num_questions"]
    assert {"id", "raw", "parsed", "answer", "prefill_s"} <= set(json.loads(lines[0]))
    assert (tmp_path / "out" / "results.md").read_text().startswith(f"# {benchmark}: ")


def test_an_interrupted_run_resumes_without_asking_finished_questions(files, tiny, tmp_path, monkeypatch):
    import cvlm.eval.runner as runner

    benchmark, path = files["mmbench-tsv"]
    straight = evaluate_model(tiny, benchmark, path, str(tmp_path / "straight"), batch_size=2, max_new_tokens=4)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(tmp_path / "straight" / "eval_fingerprint.json", out)  # what the interrupted run had recorded
    lines = (tmp_path / "straight" / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # killed mid-line
    asked = []
    original = runner._answer_generate

    def counting(model, processor, batch, max_new_tokens):
        asked.extend(q.id for q in batch)
        return original(model, processor, batch, max_new_tokens)

    monkeypatch.setattr(runner, "_answer_generate", counting)
    resumed = evaluate_model(tiny, benchmark, path, str(out), batch_size=2, max_new_tokens=4)
    assert sorted(asked) == sorted(json.loads(line)["id"] for line in lines[4:])
    assert resumed["metrics"] == straight["metrics"] and resumed["granularity"] == straight["granularity"]


def test_likelihood_mode_ranks_the_options(files, tiny, tmp_path):
    benchmark, path = files["seed-parquet"]
    results = evaluate_model(tiny, benchmark, path, str(tmp_path / "out"), mode="likelihood")
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["raw"] in "ABCD" and len(r["raw"]) == 1 for r in rows)
    assert results["metrics"]["num_questions"] == 2


def test_two_processes_merge_to_the_single_process_result(files, tiny, tmp_path):
    benchmark, path = files["mme-release"]
    run = ["eval", "--model", tiny, "--benchmark", benchmark, "--data", path, "--batch-size", "1",
           "--max-new-tokens", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "cvlm.cli", *run, "--output", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29561", "-m", "cvlm.cli", *run, "--output", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / x / "results.json").read_text()) for x in ("one", "two"))
    assert a["metrics"] == b["metrics"] and a["granularity"] == b["granularity"]
    ids = [json.loads(line)["id"] for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 4 and not list((tmp_path / "two").glob("predictions.rank*"))


def test_likelihood_ranking_reads_the_bare_question(files, tiny, tmp_path, monkeypatch):
    """SEED-Bench's protocol: the option text's likelihood after the question alone, options not listed."""
    from transformers import AutoProcessor

    import cvlm.eval.runner as runner

    benchmark, path = files["seed-json"]
    questions, _ = load_benchmark(benchmark, path, image_folder=str(Path(path).parent / "images"))
    assert questions[0].question == "What colour is the image?"
    processor = AutoProcessor.from_pretrained(tiny, trust_remote_code=True)
    seen = []
    original = processor.apply_chat_template
    monkeypatch.setattr(processor, "apply_chat_template", lambda m, **k: seen.append(m) or original(m, **k))
    from cvlm.modeling import ConnectorVLMForConditionalGeneration

    model = ConnectorVLMForConditionalGeneration.from_pretrained(tiny).eval()
    answers, _ = runner._answer_likelihood(model, processor, questions[:1], 4)
    assert answers[0] in "ABCD"
    assert seen[0][0]["content"][-1]["text"] == "What colour is the image?"


@pytest.mark.parametrize("mode", ["generate", "likelihood"])
def test_batched_answers_equal_one_question_at_a_time(files, tmp_path, mode):
    """Batches pad on the left even for a checkpoint whose tokenizer pads on the right."""
    folder = build(tmp_path / "model", vision="tiny-clip", llm="tiny-llama", connector="mlp")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "right"}))
    benchmark, path = files["mmbench-tsv"]
    kwargs = dict(max_new_tokens=4, mode=mode)
    evaluate_model(str(folder), benchmark, path, str(tmp_path / "one"), batch_size=1, **kwargs)
    evaluate_model(str(folder), benchmark, path, str(tmp_path / "six"), batch_size=6, **kwargs)
    one, six = ([json.loads(line)["raw"] for line in (tmp_path / x / "predictions.jsonl").read_text().splitlines()]
                for x in ("one", "six"))
    assert one == six

"""The synthetic granularity benchmark: deterministic, balanced, in the real formats, scoreable."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import evaluate
import pytest
from PIL import ImageStat

from cvlm.eval.loaders import load_benchmark
from cvlm.eval.runner import METRICS_DIR
from cvlm.eval.synthetic import SUBTASKS, Difficulty, make_item, write_benchmark
from cvlm.trainers.data import read_records


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("synthetic") / "b", seed=3, train_per_subtask=12, test_per_subtask=6)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_the_same_seed_writes_the_same_files_and_another_seed_does_not(bench, tmp_path):
    again = write_benchmark(tmp_path / "again", seed=3, train_per_subtask=12, test_per_subtask=6)
    other = write_benchmark(tmp_path / "other", seed=4, train_per_subtask=12, test_per_subtask=6)
    root = Path(bench["train"]).parents[1]
    assert _digest(root) == _digest(Path(again["train"]).parents[1])
    assert _digest(root) != _digest(Path(other["train"]).parents[1])


def test_every_granularity_has_at_least_three_subtasks_and_the_mapping_says_so(bench):
    assert Counter(SUBTASKS.values()) == {"coarse": 3, "fine": 4, "reasoning": 3}
    mapping = json.loads(Path(bench["mapping"]).read_text())["mapping"]
    assert mapping["mme"] == SUBTASKS and mapping["mmbench"] == SUBTASKS


def test_the_train_split_is_llava_json_with_balanced_answers(bench):
    records = read_records(bench["train"])
    assert len(records) == 12 * len(SUBTASKS)
    assert all(len(r["image"]) == 1 and Path(r["image"][0]).exists() for r in records)
    answers = Counter(r["conversations"][1]["value"] for r in records)
    assert answers["Yes"] == answers["No"] == 3 * len(SUBTASKS)  # a quarter each
    prompts = [r["conversations"][0]["value"] for r in records]
    assert sum("Answer with the option's letter" in p for p in prompts) == 3 * len(SUBTASKS)
    assert answers["red"] + answers["green"] + answers["blue"] + answers["yellow"] >= 3  # open answers


def test_the_test_splits_load_through_the_real_loaders(bench):
    mme, problems = load_benchmark("mme", bench["mme"])
    assert problems == [] and len(mme) == 2 * 6 * len(SUBTASKS)
    per_image = Counter((q.fields["question_id"], q.answer) for q in mme)
    assert set(per_image.values()) == {1}  # each picture: one Yes and one No question
    mmb, problems = load_benchmark("mmbench", bench["mmbench"])
    assert problems == [] and {q.fields["category"] for q in mmb} == set(SUBTASKS)
    originals = [q for q in mmb if q.fields["index"] < 1_000_000]
    assert len(originals) == 6 * len(SUBTASKS) and len(mmb) > len(originals)  # circular copies


def test_answering_without_looking_is_at_chance(bench):
    """The connector-independent baseline: a constant answer scores chance, by construction."""
    mme, _ = load_benchmark("mme", bench["mme"])
    result = evaluate.load(str(METRICS_DIR / "mme")).compute(
        predictions=["Yes"] * len(mme), references=[q.answer for q in mme],
        question_id=[q.fields["question_id"] for q in mme], category=[q.fields["category"] for q in mme])
    assert {round(v["acc"], 3) for v in result["subtasks"].values()} == {0.5}
    assert {v["acc_plus"] for v in result["subtasks"].values()} == {0.0}
    mmb, _ = load_benchmark("mmbench", bench["mmbench"])
    result = evaluate.load(str(METRICS_DIR / "mmbench")).compute(
        predictions=["A"] * len(mmb), references=[q.answer for q in mmb], index=[q.fields["index"] for q in mmb],
        category=[q.fields["category"] for q in mmb], l2_category=[q.fields["l2_category"] for q in mmb],
        choices=[q.choices for q in mmb])
    assert result["circular_accuracy"] == 0.0


def test_pictures_show_what_their_answers_say():
    items = [make_item("brightness", random.Random(i)) for i in range(20)]
    by = {"dark": [], "bright": []}
    for item in items:
        by[item.answer].append(ImageStat.Stat(item.image.convert("L")).mean[0])
    assert by["dark"] and by["bright"] and max(by["dark"]) < min(by["bright"])
    big = make_item("larger", random.Random(1), Difficulty(image_size=96, object_size=8))
    assert big.image.size == (96, 96) and big.options and big.answer in big.options
    assert big.yes_question != big.no_question


def test_small_objects_sit_one_per_patch_cell_and_the_scene_says_where():
    for seed in range(30):
        for subtask in ("object_colour", "count", "digit", "more", "left_of"):
            item = make_item(subtask, random.Random(seed), Difficulty(image_size=64))
            cells = [(o["box"][0] // 8, o["box"][1] // 8) for o in item.scene["objects"]]
            assert len(cells) == len(set(cells)), (subtask, seed)  # never two in one cell
            for o in item.scene["objects"]:
                x0, y0, x1, y1 = o["box"]
                assert (x0 // 8, y0 // 8) == (x1 // 8, y1 // 8), (subtask, seed, o)  # inside one cell
    item = make_item("left_of", random.Random(0), Difficulty(image_size=64))
    red = next(o for o in item.scene["objects"] if o["colour"] == "red" and o["kind"] == "square")
    blue = next(o for o in item.scene["objects"] if o["colour"] == "blue" and o["kind"] == "square")
    assert (red["box"][0] < blue["box"][0]) == (item.answer == "left")


def test_every_answer_value_is_an_option_the_loader_keeps(bench):
    """A value such as "none" reads as a missing option in MMBench TSVs: no answer may be one."""
    mmb, _ = load_benchmark("mmbench", bench["mmbench"])
    shading = {tuple(sorted(q.choices)) for q in mmb if q.fields["category"] == "shading"}
    assert shading == {("horizontal", "plain", "vertical")}
    assert all(len(q.choices) >= 2 for q in mmb)


def test_too_much_clutter_for_the_cells_names_the_fix():
    with pytest.raises(ValueError, match="lower Difficulty.clutter or raise image_size"):
        make_item("background_colour", random.Random(0), Difficulty(image_size=16, clutter=5))


def test_an_unknown_subtask_names_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        make_item("colour_of_sky", random.Random(0))
    assert str(info.value) == f"Unknown synthetic subtask 'colour_of_sky'. Allowed values: {', '.join(SUBTASKS)}."

"""Bad input across every surface, as a careless or hostile user gives it: each case gets one or two
lines that name the problem, where it is and the fix (exit status 2, no traceback), and nothing the
user had is lost or changed. The harmful cases of the reliability issue have tests of their own below."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from cvlm.build import build
from cvlm.cli import main
from cvlm.eval.formats import write_mmbench_tsv, write_mme_release, write_seed_json
from helpers import make_llava_data


# ---- the world the cases run in -------------------------------------------------------------------------------
def _tsv(path, rows: list[dict], columns: list[str]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _mmbench_items(n: int = 4) -> list[dict]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    return [{"index": i, "question": "What colour is the picture?", "options": ["red", "green", "blue", "yellow"],
             "answer": "ABCD"[i % 4], "category": "image_scene", "l2_category": "coarse_perception",
             "image": Image.new("RGB", (32, 32), colours[i % 4])} for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    build(root / "ckpt", vision="tiny-clip", llm="tiny-llama", connector="mlp", seed=0)
    data = make_llava_data(root / "data", n=4, text_only=1)
    tsv = write_mmbench_tsv(root / "mmbench.tsv", _mmbench_items(), circular=False, image_format="PNG")
    rows = list(csv.DictReader(open(tsv, newline=""), delimiter="\t"))
    columns = list(rows[0])
    files = {"ckpt": root / "ckpt", "data": data, "tsv": tsv}

    files["tsv_no_answer"] = _tsv(root / "test_split.tsv", rows, [c for c in columns if c != "answer"])
    files["tsv_no_question"] = _tsv(root / "no_question.tsv", rows, [c for c in columns if c != "question"])
    files["tsv_header_only"] = _tsv(root / "header_only.tsv", [], columns)
    files["tsv_bad_answer"] = _tsv(root / "bad_answer.tsv", [{**r, "answer": "E"} for r in rows], columns)
    files["tsv_bad_images"] = _tsv(root / "bad_images.tsv", [{**r, "image": "!!notbase64!!" * 10} for r in rows], columns)
    (root / "latin1.tsv").write_bytes("index\tquestion\n1\tcaf\xe9\n".encode("latin-1"))
    files["tsv_latin1"] = str(root / "latin1.tsv")

    mapping = json.loads(Path("eval/granularity_mapping.json").read_text()) if Path("eval/granularity_mapping.json").exists() \
        else json.loads((Path(__file__).parents[1] / "eval" / "granularity_mapping.json").read_text())
    (root / "mapping_broken.json").write_text('{"mapping": {"mmbench": ')
    (root / "mapping_layout.json").write_text(json.dumps({"mmbench": {"image_scene": "coarse"}}))
    (root / "mapping_medium.json").write_text(json.dumps({"mapping": {"mmbench": {"image_scene": "medium"}}}))
    (root / "mapping_gap.json").write_text(json.dumps({"mapping": {"mmbench": {"image_style": "coarse"}}}))
    assert mapping["mapping"]["mmbench"]["image_scene"] == "coarse"

    seed = root / "seed"
    seed_items = [{"question_id": i, "question": "Which colour?", "choices": ["red", "green", "blue", "yellow"],
                   "answer": "A", "question_type_id": 1, "image": Image.new("RGB", (32, 32), (200, 30, 30))}
                  for i in range(2)]
    write_seed_json(seed, seed_items)
    (root / "seed_broken.json").write_text('{"questions": [')
    (root / "seed_list.json").write_text(json.dumps({"questions": "not a list"}))

    mme = write_mme_release(root / "mme", [{"subtask": "color", "name": "a", "image": Image.new("RGB", (32, 32)),
                                            "qa": [("Is it black? Please answer yes or no.", "maybe")]}])
    files.update(seed=str(seed / "SEED-Bench.json"), mme=str(mme))

    # training data, broken in every way a file can be
    images = Path(data).parent / "images"
    good = json.loads(Path(data).read_text())
    with_image = good[0]

    def write(name, text_or_records):  # next to the good data, so that its image paths resolve
        path = Path(data).parent / name
        path.write_text(text_or_records if isinstance(text_or_records, str) else json.dumps(text_or_records))
        return str(path)

    files["d_broken"] = write("broken.json", '[{"id": 1, "conversations": [}')
    files["d_jsonl"] = write("bad.jsonl", json.dumps(with_image) + "\n{oops\n")
    files["d_empty"] = write("empty.json", "  \n")
    files["d_strings"] = write("strings.json", ["a", "b"])
    files["d_no_conv"] = write("no_conv.json", [{"id": "r1", "image": with_image["image"]}])
    files["d_robot"] = write("robot.json", [{"id": "r2", "conversations": [{"from": "robot", "value": "hi"}]}])
    files["d_two_tokens"] = write("two.json", [{**with_image, "id": "r3", "conversations": [
        {"from": "human", "value": "<image><image> What?"}, {"from": "gpt", "value": "red"}]}])
    files["d_missing_image"] = write("missing.json", [{**with_image, "id": "r4", "image": "images/none.png"}])
    files["d_no_answer"] = write("no_answer.json", [{"id": "r5", "conversations": [{"from": "human", "value": "hi"}]}])
    files["d_image_dict"] = write("image_dict.json", [{**with_image, "id": "r6", "image": {"path": "x"}}])
    truncated = images / "truncated.jpg"
    Image.new("RGB", (64, 64), (10, 120, 200)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    files["d_truncated"] = write("truncated.json", [*good, {**with_image, "id": "cut-jpeg", "image": "images/truncated.jpg"}])
    (Path(data).parent / "latin1.json").write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    files["d_latin1"] = str(Path(data).parent / "latin1.json")
    not_image = images / "notes.png"
    not_image.write_text("text, not a picture")
    files.update(truncated_jpg=str(truncated), not_image=str(not_image))

    # checkpoints broken or foreign
    cut = root / "cut_weights"
    shutil.copytree(root / "ckpt", cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_config = root / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    bad_json = root / "bad_json_ckpt"
    shutil.copytree(root / "ckpt", bad_json)
    (bad_json / "config.json").write_text("{not json")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {"AutoModel": "mystery.Model"}}))
    vision_only = root / "vision_only"
    from cvlm.presets import tiny_vision

    vision_model, _ = tiny_vision("tiny-clip")
    vision_model.save_pretrained(vision_only)
    plain_lm = root / "plain_lm"
    plain_lm.mkdir()
    (plain_lm / "config.json").write_text(json.dumps({"model_type": "llama"}))
    qformer = build(root / "qformer", vision="tiny-clip", llm="tiny-llama", connector="qformer")
    files.update(cut=str(cut), no_config=str(no_config), bad_json_ckpt=str(bad_json), foreign=str(foreign),
                 vision_only=str(vision_only), plain_lm=str(plain_lm), qformer=str(qformer))

    # the user's own things, which no case may touch
    user = root / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    (user / "thesis").mkdir()
    (user / "thesis" / "chapter1.tex").write_text("\\section{Intro}")
    work = root / "work"
    work.mkdir()
    (work / "draft.txt").write_text("my draft")
    user_file = root / "paper.pdf"
    user_file.write_bytes(b"%PDF-1.4 mine")
    files.update(user=str(user), user_file=str(user_file), root=str(root), work=str(work))
    return root, files


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    return code, capsys.readouterr().err


# ---- the sweep ----------------------------------------------------------------------------------------------
T = "train --stage align --max_steps 2 --report_to none --output_dir {root}/out-{case}"
CASES = [
    # build: where it writes
    ("build-output-cwd", "build --output .", "is the current folder"),
    ("build-output-parent", "build --output ..", "is the current folder, a folder that holds it"),
    ("build-output-user-folder", "build --output {user}", "already holds files this tool did not write (notes.txt, thesis). Pick a new folder, or pass --overwrite"),
    ("build-output-file", "build --output {user_file}", "is a file, not a folder"),
    # build: what it builds from
    ("build-vision-missing", "build --vision ./no-such-encoder --output {root}/o1", "--vision ./no-such-encoder: no such folder"),
    ("build-vision-no-config", "build --vision {no_config} --output {root}/o1", "the folder has no config.json"),
    ("build-vision-a-file", "build --vision {user_file} --output {root}/o1", "is a file; give a model folder"),
    ("build-llm-missing", "build --llm ./no-such-lm --output {root}/o1", "--llm ./no-such-lm: no such folder"),
    ("build-llm-deep-path", "build --llm a/b/c --output {root}/o1", "no such folder"),
    ("build-connector-unknown", "build --connector mlp3 --output {root}/o1", "'mlp3' is not a registered connector"),
    ("build-depth-huge", "build --connector-arg depth=100000000 --output {root}/o1", "depth=100000000 is invalid for 'mlp': use at most 64"),
    ("build-depth-zero", "build --connector-arg depth=0 --output {root}/o1", "depth=0 is invalid for 'mlp': use an integer >= 1"),
    ("build-queries-huge", "build --connector qformer --connector-arg num_queries=10000000 --output {root}/o1", "use at most 16384"),
    ("build-experts-huge", "build --connector moe --connector-arg num_experts=100000 --output {root}/o1", "use at most 256"),
    ("build-hyper-unknown", "build --connector-arg width=3 --output {root}/o1", "'width', which the 'mlp' connector does not take"),
    ("build-hyper-not-kv", "build --connector-arg depth --output {root}/o1", "is not key=value"),
    ("build-act-unknown", "build --connector-arg act=sparkle --output {root}/o1", "act='sparkle' is not an activation"),
    ("build-image-size-zero", "build --image-size 0 --output {root}/o1", "0 is out of range: use a size in pixels from 1 to 8192"),
    ("build-image-size-huge", "build --image-size 100000 --output {root}/o1", "out of range: use a size in pixels from 1 to 8192"),
    ("build-image-size-text", "build --image-size big --output {root}/o1", "'big' is not a whole number"),
    ("build-image-size-not-patch", "build --image-size 33 --output {root}/o1", "--image-size 33 is not a multiple of the encoder's patch size 8"),
    ("build-feature-layer", "build --feature-layer 99 --output {root}/o1", "layer 99 does not exist in a vision encoder with 4 layers"),
    ("build-dense-layers", "build --connector dense_sci --connector-arg layers=[100] --output {root}/o1", "connector_config layers=[100]: layer 100 does not exist in a vision encoder with 4 layers"),
    ("build-full-strategy-pool", "build --connector avgpool --select-strategy full --output {root}/o1", "cannot take the encoder's 1 prefix token"),
    ("build-output-grid", "build --connector avgpool --connector-arg output_grid=99 --output {root}/o1", "is larger than the 4x4 patch grid"),
    ("build-shuffle-scale", "build --connector pixel_shuffle --connector-arg scale=3 --output {root}/o1", "scale"),
    ("build-seed-negative", "build --seed -1 --output {root}/o1", "-1 is out of range"),
    ("build-dtype", "build --dtype float8 --output {root}/o1", "invalid choice: 'float8'"),
    # generate
    ("gen-model-missing", "generate ./no-model --prompt hi", "./no-model: no such checkpoint folder"),
    ("gen-model-no-config", "generate {no_config} --prompt hi", "has no config.json: it is not a saved model folder"),
    ("gen-model-bad-json", "generate {bad_json_ckpt} --prompt hi", "config.json is not valid JSON: Expecting property name"),
    ("gen-model-cut-weights", "generate {cut} --prompt hi", "model.safetensors cannot be read"),
    ("gen-model-foreign-code", "generate {foreign} --prompt hi", "names its own code (auto_map). Read that code, then pass --trust-remote-code"),
    ("gen-image-missing", "generate {ckpt} --prompt hi --image {root}/none.png", "--image: image file"),
    ("gen-image-not-image", "generate {ckpt} --prompt hi --image {not_image}", "is not a readable image"),
    ("gen-image-truncated", "generate {ckpt} --prompt hi --image {truncated_jpg}", "truncated.jpg is not a readable image"),
    ("gen-image-folder", "generate {ckpt} --prompt hi --image {user}", "is a folder, not an image file"),
    ("gen-max-new-tokens", "generate {ckpt} --prompt hi --max-new-tokens 0", "0 is out of range"),
    ("gen-empty-prompt", "generate {ckpt} --prompt ' '", "--prompt is empty"),
    # eval: numbers
    ("eval-limit-negative", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --limit -5", "-5 is out of range"),
    ("eval-limit-zero", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --limit 0", "0 is out of range"),
    ("eval-batch-zero", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --batch-size 0", "0 is out of range"),
    ("eval-new-tokens-zero", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --max-new-tokens 0", "0 is out of range"),
    ("eval-benchmark", "eval --model {ckpt} --benchmark mmmu --data {tsv} --output {root}/e", "invalid choice: 'mmmu'"),
    ("eval-mode", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --mode vote", "invalid choice: 'vote'"),
    # eval: files
    ("eval-data-missing", "eval --model {ckpt} --benchmark mmbench --data {root}/none.tsv --output {root}/e", "none.tsv does not exist"),
    ("eval-tsv-test-split", "eval --model {ckpt} --benchmark mmbench --data {tsv_no_answer} --output {root}/e", "has no 'answer' column: this is a test split"),
    ("eval-tsv-no-question", "eval --model {ckpt} --benchmark mmbench --data {tsv_no_question} --output {root}/e", "lacks the column(s) question"),
    ("eval-tsv-header-only", "eval --model {ckpt} --benchmark mmbench --data {tsv_header_only} --output {root}/e", "has no rows"),
    ("eval-tsv-bad-answers", "eval --model {ckpt} --benchmark mmbench --data {tsv_bad_answer} --output {root}/e", "answer 'E' is not one of the options A, B, C, D"),
    ("eval-tsv-bad-images", "eval --model {ckpt} --benchmark mmbench --data {tsv_bad_images} --output {root}/e", "the image is not valid base64 of an image file"),
    ("eval-tsv-latin1", "eval --model {ckpt} --benchmark mmbench --data {tsv_latin1} --output {root}/e", "latin1.tsv is not UTF-8 text"),
    ("eval-seed-broken", "eval --model {ckpt} --benchmark seed_bench --data {root}/seed_broken.json --output {root}/e", "seed_broken.json is not valid JSON"),
    ("eval-seed-layout", "eval --model {ckpt} --benchmark seed_bench --data {root}/seed_list.json --output {root}/e", "needs a 'questions' list"),
    ("eval-mme-answer", "eval --model {ckpt} --benchmark mme --data {mme} --output {root}/e", "answer 'maybe' is not Yes or No"),
    ("eval-mapping-broken", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --mapping {root}/mapping_broken.json", "mapping_broken.json is not valid JSON"),
    ("eval-mapping-layout", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --mapping {root}/mapping_layout.json", "is not a granularity mapping"),
    ("eval-mapping-medium", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --mapping {root}/mapping_medium.json", "mmbench/image_scene maps to 'medium'. Allowed values: coarse, fine, reasoning"),
    ("eval-mapping-gap", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --mapping {root}/mapping_gap.json", "has no granularity for mmbench subtask(s) image_scene"),
    ("eval-mapping-missing", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {root}/e --mapping {root}/none.json", "--mapping {root}/none.json does not exist"),
    ("eval-output-user", "eval --model {ckpt} --benchmark mmbench --data {tsv} --output {user}", "already holds files this tool did not write"),
    ("eval-model-missing", "eval --model ./nothing --benchmark mmbench --data {tsv} --output {root}/e", "no such checkpoint folder"),
    ("eval-model-cut", "eval --model {cut} --benchmark mmbench --data {tsv} --output {root}/e", "cannot be read"),
    # train
    ("train-model-missing", T + " --model ./nothing --data {data}", "./nothing: no such checkpoint folder"),
    ("train-model-not-family", T + " --model {plain_lm} --data {data}", "is a 'llama' checkpoint, not connector-vlm"),
    ("train-model-cut", T + " --model {cut} --data {data}", "model.safetensors cannot be read"),
    ("train-data-missing", T + " --model {ckpt} --data {root}/none.json", "--data {root}/none.json does not exist"),
    ("train-data-broken", T + " --model {ckpt} --data {d_broken}", "broken.json is not valid JSON: Expecting value at line 1, column 30"),
    ("train-data-jsonl", T + " --model {ckpt} --data {d_jsonl}", "bad.jsonl, line 2, is not valid JSON"),
    ("train-data-empty", T + " --model {ckpt} --data {d_empty}", "empty.json is empty"),
    ("train-data-strings", T + " --model {ckpt} --data {d_strings}", "record #0 is a str, not an object"),
    ("train-data-latin1", T + " --model {ckpt} --data {d_latin1}", "latin1.json is not UTF-8 text"),
    ("train-data-no-conversations", T + " --model {ckpt} --data {d_no_conv}", "Record 'r1' has no 'conversations' list"),
    ("train-data-robot", T + " --model {ckpt} --data {d_robot}", "Record 'r2' has a turn from 'robot': use 'human', 'gpt' or 'system'"),
    ("train-data-two-tokens", T + " --model {ckpt} --data {d_two_tokens}", "Record 'r3' has 2 <image> token(s) but 1 image(s)"),
    ("train-data-missing-image", T + " --model {ckpt} --data {d_missing_image}", "Record 'r4': image file"),
    ("train-data-no-answer", T + " --model {ckpt} --data {d_no_answer}", "Record 'r5' has no assistant ('gpt') turn"),
    ("train-data-image-dict", T + " --model {ckpt} --data {d_image_dict}", "has an 'image' that is neither a path nor a list of paths"),
    ("train-data-truncated-jpeg", T + " --model {ckpt} --data {d_truncated}", "Record 'cut-jpeg': image file"),
    ("train-image-folder", T + " --model {ckpt} --data {data} --image_folder {root}/nothing", "--image_folder {root}/nothing is not a folder"),
    ("train-max-steps-zero", T.replace("--max_steps 2", "--max_steps 0") + " --model {ckpt} --data {data}", "--max_steps 0 is invalid"),
    ("train-batch-zero", T + " --model {ckpt} --data {data} --per_device_train_batch_size 0", "--per_device_train_batch_size 0 is invalid: use a value at least 1"),
    ("train-lr-zero", T + " --model {ckpt} --data {data} --learning_rate 0", "--learning_rate 0.0 is invalid: use a value above 0"),
    ("train-lora-r-zero", T + " --model {ckpt} --data {data} --lora_r 0", "--lora_r 0 is invalid"),
    ("train-dropout", T + " --model {ckpt} --data {data} --lora_dropout 1.5", "--lora_dropout 1.5 is invalid: use a value in [0, 1)"),
    ("train-max-length-zero", T + " --model {ckpt} --data {data} --model_max_length 0", "--model_max_length 0 is invalid"),
    ("train-stage", T.replace("--stage align", "--stage pretrain") + " --model {ckpt} --data {data}", "--stage 'pretrain' is invalid. Allowed values: align, finetune"),
    ("train-finetune-unaligned", T.replace("--stage align", "--stage finetune") + " --model {ckpt} --data {data}", "is not a stage-1 (align) output"),
    ("train-output-user", "train --model {ckpt} --data {data} --max_steps 2 --report_to none --output_dir {user}", "--output_dir {user} already holds files this tool did not write"),
    ("train-output-cwd", "train --model {ckpt} --data {data} --max_steps 2 --report_to none --output_dir .", "is the current folder"),
    ("train-lora-target", T.replace("--stage align", "--stage finetune") + " --model {ckpt} --data {data} --allow_unaligned true --lora_target nothing_here", "--lora_target 'nothing_here' matches no linear layer"),
    # convert
    ("from-llava-vision-only", "convert from-llava {vision_only} --output {root}/c1", "is a 'clip_vision_model' checkpoint. from-llava takes a LlavaForConditionalGeneration"),
    ("from-llava-missing", "convert from-llava ./nothing --output {root}/c1", "./nothing: no such checkpoint folder"),
    ("from-llava-output-user", "convert from-llava {vision_only} --output {user}", "already holds files this tool did not write"),
    ("to-llava-qformer", "convert to-llava {qformer} --output {root}/c2", "cannot be expressed by LlavaForConditionalGeneration"),
    ("to-llava-output-user", "convert to-llava {ckpt} --output {user}", "already holds files this tool did not write"),
    ("to-llava-foreign", "convert to-llava {vision_only} --output {root}/c3", "is not a connector-vlm checkpoint"),
    # cards and push
    ("card-not-checkpoint", "card {user}", "has no config.json: `cvlm card` writes the card of a checkpoint folder"),
    ("card-bad-json", "card {bad_json_ckpt}", "config.json is not valid JSON"),
    ("card-foreign", "card {vision_only}", "is not a connector-vlm checkpoint"),
    ("push-incomplete", "push {no_config} --repo-id org/name --dry-run", "is not complete, so it is not pushed"),
    ("push-not-folder", "push {root}/nothing --repo-id org/name --dry-run", "is not a folder"),
    # study
    ("study-connector", "study --connectors mlp3 --output {root}/s", "'mlp3' is not a registered connector"),
    ("study-connector-hyper", "study --connectors avgpool:depth=0 --output {root}/s", "--connectors 'avgpool:depth=0': connector_config depth=0 is invalid"),
    ("study-resolution", "study --resolutions 0 --output {root}/s", "0 is out of range"),
    ("study-workers", "study --workers 0 --output {root}/s", "0 is out of range: use a number of processes from 1 to 64"),
    ("study-steps", "study --finetune-steps 0 --output {root}/s", "0 is out of range"),
    ("study-lr", "study --finetune-lr -1 --output {root}/s", "-1 is out of range"),
    ("study-output-user", "study --quick --output {user}", "already holds files this tool did not write"),
    ("study-output-file", "study --quick --output {user_file}", "is a file, not a folder"),
    # space, connectors
    ("space-port", "space --port 70000", "70000 is out of range: use a port from 1 to 65535"),
    ("connectors-grid", "connectors --grid 0 4", "0 is out of range"),
]


@pytest.mark.parametrize("case, command, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_and_loses_nothing(world, case, command, expected, capsys, monkeypatch):
    root, files = world
    monkeypatch.chdir(files["work"])  # the user works in a folder of their own
    before = {name: tree_digest(Path(files[name])) for name in ("user", "work", "ckpt")}
    pdf = Path(files["user_file"]).read_bytes()
    values = {**files, "case": case}
    argv = [part.format(**values) for part in _split(command)]
    code, err = run_cli(argv, capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "warn" not in line.lower()]
    assert len(lines) == 1, err
    assert expected.format(**values) in err, err
    assert {name: tree_digest(Path(files[name])) for name in ("user", "work", "ckpt")} == before
    assert Path(files["user_file"]).read_bytes() == pdf


def _split(command: str) -> list[str]:
    import shlex

    return shlex.split(command)


def test_the_sweep_covers_every_surface():
    surfaces = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 80
    assert {"build", "gen", "eval", "train", "from", "to", "card", "push", "study", "space", "connectors"} <= surfaces


def test_debug_shows_the_traceback(world, capsys, monkeypatch):
    root, files = world
    monkeypatch.chdir(files["user"])
    with pytest.raises(ValueError, match="is the current folder"):
        main(["build", "--output", ".", "--debug"])


# ---- the harmful reproductions, one by one ----------------------------------------------------------------------
def test_build_into_the_current_folder_deletes_nothing(world, tmp_path, capsys, monkeypatch):
    work = tmp_path / "d"
    work.mkdir()
    (work / "notes.txt").write_text("x")
    monkeypatch.chdir(work)
    assert run_cli(["build", "--output", "."], capsys)[0] == 2
    assert (work / "notes.txt").read_text() == "x" and [p.name for p in work.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_a_users_folder_only_when_asked(world, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("x")
    assert run_cli(["build", "--output", str(target)], capsys)[0] == 2
    assert (target / "notes.txt").exists()
    assert run_cli(["build", "--output", str(target), "--overwrite"], capsys)[0] == 0
    assert (target / "config.json").exists() and not (target / "notes.txt").exists()
    again = run_cli(["build", "--output", str(target), "--connector", "linear"], capsys)  # ours now: replaced
    assert again[0] == 0 and json.loads((target / "config.json").read_text())["connector_type"] == "linear"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine.")]  # no staging left behind


def _sentinel_module(folder: Path, sentinel: Path, name: str = "evil") -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(sentinel)!r}).write_text("ran")
        from transformers import PreTrainedTokenizerFast as Evil
        from transformers import PreTrainedModel as EvilModel
    """))


def test_train_runs_no_tokenizer_code_found_in_the_model_folder(world, tmp_path, capsys):
    root, files = world
    model = tmp_path / "model"
    shutil.copytree(files["ckpt"], model)
    sentinel = tmp_path / "ran.txt"
    _sentinel_module(model, sentinel)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil.Evil"]}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    code, err = run_cli(["train", "--model", str(model), "--data", files["data"], "--stage", "align", "--max_steps", "1",
                         "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--save_strategy", "no"], capsys)
    assert code == 0, err
    assert not sentinel.exists()


def test_a_checkpoint_whose_auto_map_points_elsewhere_runs_nothing_and_is_refused_by_push_and_card(world, tmp_path, capsys,
                                                                                                    caplog):
    root, files = world
    other = tmp_path / "other" / "dir"
    other.mkdir(parents=True)
    sentinel = tmp_path / "ran.txt"
    _sentinel_module(other, sentinel, "module")
    model = tmp_path / "model"
    shutil.copytree(files["ckpt"], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "other/dir--module.EvilModel"
    (model / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["generate", str(model), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 0 and "auto_map entry config.json: other/dir--module.EvilModel points outside the checkpoint" in caplog.text
    code, err = run_cli(["push", str(model), "--repo-id", "org/name", "--dry-run"], capsys)
    assert code == 2 and "auto_map entries point outside the checkpoint (config.json: other/dir--module.EvilModel)" in err
    code, err = run_cli(["card", str(model)], capsys)
    assert code == 2 and "point outside the checkpoint" in err
    assert not sentinel.exists()


def test_push_refuses_to_run_modeling_code_that_is_not_ours(world, tmp_path, capsys):
    root, files = world
    model = tmp_path / "model"
    shutil.copytree(files["ckpt"], model)
    sentinel = tmp_path / "ran.txt"
    code_file = model / "modeling_connector_vlm.py"
    code_file.write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n" + code_file.read_text())
    code, err = run_cli(["push", str(model), "--repo-id", "org/name", "--dry-run"], capsys)
    assert code == 2 and "carries code that is not connector-vlm's own (modeling_connector_vlm.py)" in err
    assert "--trust-remote-code" in err and not sentinel.exists()


def test_eval_records_results_only_in_checkpoints_cvlm_wrote_and_may_write(world, tmp_path, capsys):
    """`cvlm eval` says where it recorded the results; --no-card, a folder another tool wrote, a Hub cache
    snapshot and a read-only folder are left byte for byte as they were, with a line saying why."""
    root, files = world
    args = ["--benchmark", "mmbench", "--data", files["tsv"], "--mode", "likelihood", "--limit", "2"]

    def state(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    mine = tmp_path / "mine"
    shutil.copytree(files["ckpt"], mine)
    code, err = run_cli(["eval", "--model", str(mine), *args, "--output", str(tmp_path / "e1")], capsys)
    assert code == 0 and f"Recorded the results in {mine / 'eval_results' / 'mmbench.json'} and its card" in err
    assert json.loads((mine / "eval_results" / "mmbench.json").read_text())["num_questions"] == 2

    untouched = tmp_path / "untouched"
    shutil.copytree(files["ckpt"], untouched)
    before = state(untouched)
    code, err = run_cli(["eval", "--model", str(untouched), *args, "--output", str(tmp_path / "e2"), "--no-card"], capsys)
    assert code == 0 and "Recorded" not in err and state(untouched) == before

    for marker in ("cvlm_build.json", "cvlm_training.json", "cvlm_convert.json"):
        (untouched / marker).unlink(missing_ok=True)
    before = state(untouched)
    code, err = run_cli(["eval", "--model", str(untouched), *args, "--output", str(tmp_path / "e3")], capsys)
    assert code == 0 and state(untouched) == before
    assert f"Results not recorded in {untouched}: it was not written by cvlm (none of cvlm_build.json" in err

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in Path(files["ckpt"]).iterdir():  # a Hub cache snapshot: links into the blob store
        (snapshot / path.name).symlink_to(path.resolve())
    code, err = run_cli(["eval", "--model", str(snapshot), *args, "--output", str(tmp_path / "e4")], capsys)
    assert code == 0 and "it is a Hub cache snapshot" in err and not (snapshot / "eval_results").exists()

    locked = tmp_path / "locked"
    shutil.copytree(files["ckpt"], locked)
    before = state(locked)
    locked.chmod(0o555)
    try:
        code, err = run_cli(["eval", "--model", str(locked), *args, "--output", str(tmp_path / "e5")], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 0 and f"Results not recorded in {locked}: it is read-only." in err and state(locked) == before


def test_eval_never_reuses_another_models_predictions(world, tmp_path, capsys):
    root, files = world
    out = tmp_path / "eval"
    other = tmp_path / "other"
    build(other, vision="tiny-clip", llm="tiny-llama", connector="mlp", seed=1)
    args = ["--benchmark", "mmbench", "--data", files["tsv"], "--output", str(out), "--mode", "likelihood"]
    assert run_cli(["eval", "--model", files["ckpt"], *args], capsys)[0] == 0
    first = (out / "predictions.jsonl").read_text()
    code, err = run_cli(["eval", "--model", str(other), *args], capsys)
    assert code == 2 and "holds predictions of another run (model differ)" in err and "--overwrite" in err
    assert (out / "predictions.jsonl").read_text() == first and not (other / "eval_results").exists()
    assert run_cli(["eval", "--model", str(other), *args, "--overwrite"], capsys)[0] == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(other)
    assert json.loads((other / "eval_results" / "mmbench.json").read_text())["model"] == str(other)
    # the same model again: its own predictions are resumed, nothing asked twice
    assert run_cli(["eval", "--model", str(other), *args], capsys)[0] == 0


def test_lowercase_answer_letters_are_scored_as_their_letters(world, tmp_path):
    from cvlm.eval.loaders import load_mmbench

    root, files = world
    rows = list(csv.DictReader(open(files["tsv"], newline=""), delimiter="\t"))
    lower = _tsv(tmp_path / "lower.tsv", [{**r, "answer": r["answer"].lower() + " "} for r in rows], list(rows[0]))
    questions, problems = load_mmbench(lower)
    assert problems == [] and [q.answer for q in questions] == [r["answer"] for r in rows]


def test_one_unreadable_row_drops_its_circular_group_and_the_rest_is_scored(tmp_path):
    from cvlm.eval.loaders import load_mmbench

    tsv = write_mmbench_tsv(tmp_path / "c.tsv", _mmbench_items(3), circular=True, image_format="PNG")
    rows = list(csv.DictReader(open(tsv, newline=""), delimiter="\t"))
    rows[1]["image"] = base64.b64encode(b"not an image at all").decode()  # a circular pass of question 0
    broken = _tsv(tmp_path / "broken.tsv", rows, list(rows[0]))
    questions, problems = load_mmbench(broken)
    groups = {int(q.id) % 1_000_000 for q in questions}
    assert groups == {1, 2} and len(questions) == 8
    assert problems[0] == f"{rows[1]['index']}: the image is not valid base64 of an image file"
    assert all("dropped with its question 0" in p for p in problems[1:]) and len(problems) == 4


def test_the_same_pixels_on_every_path_for_16_bit_alpha_palette_and_cmyk(world, tmp_path):
    import numpy as np

    from cvlm.eval.loaders import Question
    from cvlm.modeling import ConnectorVLMProcessor
    from cvlm.trainers.data import load_image

    root, files = world
    processor = ConnectorVLMProcessor.from_pretrained(files["ckpt"])
    wide = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    pictures = {"16bit.png": Image.fromarray(wide), "rgba.png": Image.new("RGBA", (32, 32), (200, 0, 0, 100)),
                "cmyk.jpg": Image.new("CMYK", (32, 32), (0, 200, 0, 0))}
    palette = Image.new("P", (32, 32), 3)
    palette.info["transparency"] = 3
    pictures["palette.png"] = palette
    for name, picture in pictures.items():
        path = tmp_path / name
        picture.save(path, **({"transparency": 3} if name == "palette.png" else {}))
        with Image.open(path) as opened:
            opened.load()
            direct = processor(images=[opened.copy()], text=["<image>"], return_tensors="pt")["pixel_values"]
        train = processor.image_processor([load_image(str(path))], return_tensors="pt")["pixel_values"]
        evaluation = processor.image_processor([Question("mmbench", "1", str(path), "", "A").load_image()],
                                               return_tensors="pt")["pixel_values"]
        assert direct.equal(train) and train.equal(evaluation), name
    sixteen = np.asarray(load_image(str(tmp_path / "16bit.png")), dtype=float)
    assert abs(sixteen.mean() - 127.5) < 1.5  # scaled, not clipped to almost white
    assert tuple(np.asarray(load_image(str(tmp_path / "rgba.png")))[0, 0]) == (233, 155, 155)  # on white


def test_a_truncated_jpeg_is_found_before_training_with_its_record(world, tmp_path, capsys):
    root, files = world
    code, err = run_cli(["train", "--model", files["ckpt"], "--data", files["d_truncated"], "--max_steps", "20",
                         "--report_to", "none", "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "Record 'cut-jpeg'" in err and "truncated.jpg is not a readable image" in err
    assert not (tmp_path / "out" / "checkpoint-4").exists() and not list((tmp_path).glob("out/checkpoint-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie has ended


def test_a_study_worker_dies_with_its_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing, os, sys, time
        from concurrent.futures import ProcessPoolExecutor
        from cvlm.study import die_with_parent

        def pid():
            return os.getpid()

        if __name__ == "__main__":
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=die_with_parent, initargs=(os.getpid(),))
            print(pool.submit(pid).result(), flush=True)
            time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(50):
        if not _alive(worker):
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")


def test_fingerprints_see_a_changed_data_folder_and_a_checkpoint_changed_in_place(tmp_path):
    from cvlm.files import model_digest, path_digest

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"one")
    before = path_digest(folder)
    (folder / "b.png").write_bytes(b"two")
    assert path_digest(folder) != before
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"aaaa")
    stamp = weights.stat().st_mtime_ns
    first = model_digest(checkpoint)
    weights.write_bytes(b"bbbb")  # same size and, below, the same time: only the bytes tell
    os.utime(weights, ns=(stamp, stamp))
    assert model_digest(checkpoint) != first

"""Writers of the benchmarks' real file formats, for data the project makes itself (tests, the
synthetic granularity benchmark): MME release folders and lmms-lab parquet, the MMBench TSV
(base64 images, circular copies) and lmms-lab parquet, the SEED-Bench JSON + images and lmms-lab
parquet. What they write is what `eval.loaders` reads from the official releases."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

CIRCULAR_OFFSET = 1_000_000


def _jpeg_base64(image: Image.Image, image_format: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return base64.b64encode(buffer.getvalue()).decode()


def write_mme_release(folder, items: list[dict], layout: str = "questions_answers_YN") -> Path:
    """items: {"subtask", "name", "image": PIL, "qa": [(question, "Yes"|"No"), (question, "Yes"|"No")]}.
    layout "questions_answers_YN" (images/ + questions_answers_YN/) or "side_by_side"."""
    folder = Path(folder)
    for item in items:
        sub = folder / item["subtask"]
        image_dir, qa_dir = (sub / "images", sub / "questions_answers_YN") if layout == "questions_answers_YN" else (sub, sub)
        image_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        item["image"].convert("RGB").save(image_dir / f"{item['name']}.png")
        (qa_dir / f"{item['name']}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in item["qa"]))
    return folder


def write_mme_parquet(path, items: list[dict]) -> Path:
    """The lmms-lab/MME layout: question_id, image, question, answer, category (two rows per image)."""
    import datasets

    rows = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for item in items:
        for question, answer in item["qa"]:
            rows["question_id"].append(f"{item['subtask']}/{item['name']}.png")
            rows["image"].append(item["image"].convert("RGB"))
            rows["question"].append(question)
            rows["answer"].append(answer)
            rows["category"].append(item["subtask"])
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "category": datasets.Value("string")})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def mmbench_rows(items: list[dict], circular: bool = True) -> list[dict]:
    """items: {"index", "question", "hint", "options": [..], "answer": letter, "category", "l2_category",
    "image": PIL}. With `circular`, each question also appears with its options shifted (index + k*1e6)."""
    rows = []
    for item in items:
        options, right = list(item["options"]), "ABCD".index(item["answer"])
        for shift in range(len(options) if circular else 1):
            rotated = options[shift:] + options[:shift]
            row = {"index": item["index"] + shift * CIRCULAR_OFFSET, "question": item["question"],
                   "hint": item.get("hint") or "nan", "answer": "ABCD"[(right - shift) % len(options)],
                   "category": item["category"], "l2-category": item["l2_category"], "image": item["image"],
                   "source": "connector-vlm", "split": "dev", "comment": "nan"}
            row.update({"ABCD"[i]: (rotated[i] if i < len(rotated) else "nan") for i in range(4)})
            rows.append(row)
    return rows


def write_mmbench_tsv(path, items: list[dict], circular: bool = True, image_format: str = "JPEG") -> Path:
    """The official TSV: index, question, hint, A-D, answer, category, image (base64), source, l2-category, ...
    Images are JPEG as in the official files; `image_format="PNG"` keeps pixels exact (small drawn objects)."""
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        for row in mmbench_rows(items, circular):
            image = row["image"] if isinstance(row["image"], str) else _jpeg_base64(row["image"], image_format)
            writer.writerow({**row, "image": image})
    return path


def write_mmbench_parquet(path, items: list[dict], circular: bool = True) -> Path:
    """The lmms-lab/MMBench layout (column `L2-category`, images decoded)."""
    import datasets

    rows = mmbench_rows(items, circular)
    table = {k: [r[k] for r in rows] for k in rows[0] if k != "l2-category"}
    table["L2-category"] = [r["l2-category"] for r in rows]
    table["image"] = [r["image"].convert("RGB") for r in rows]
    features = datasets.Features({k: (datasets.Image() if k == "image" else datasets.Value("int64") if k == "index"
                                      else datasets.Value("string")) for k in table})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path


SEED_DIMENSIONS = {"Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3,
                   "Instance Location": 4, "Instances Counting": 5, "Spatial Relation": 6,
                   "Instance Interaction": 7, "Visual Reasoning": 8, "Text Understanding": 9}


def write_seed_json(folder, items: list[dict]) -> Path:
    """SEED-Bench.json ({"questions": [...], "question_type": {...}}) + images named by data_id.
    items: {"question_id", "question", "choices": [4], "answer": letter, "question_type_id", "image": PIL}."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    questions = []
    for item in items:
        data_id = f"{item['question_id']}.png"
        if item.get("image") is not None:
            item["image"].convert("RGB").save(folder / "images" / data_id)
        questions.append({"answer": item["answer"], **{f"choice_{x}": c for x, c in zip("abcd", item["choices"])},
                          "data_id": data_id, "data_type": "image", "question": item["question"],
                          "question_id": str(item["question_id"]), "question_type_id": item["question_type_id"]})
    path = folder / "SEED-Bench.json"
    path.write_text(json.dumps({"questions": questions, "question_type": SEED_DIMENSIONS}))
    return path


def write_seed_parquet(path, items: list[dict]) -> Path:
    """The lmms-lab/SEED-Bench layout: the JSON's fields plus `image` (a list of images) and `segment`."""
    import datasets

    table = {"answer": [], "choice_a": [], "choice_b": [], "choice_c": [], "choice_d": [], "data_id": [],
             "data_type": [], "question": [], "question_id": [], "question_type_id": [], "image": [], "segment": []}
    for item in items:
        table["answer"].append(item["answer"])
        for x, c in zip("abcd", item["choices"]):
            table[f"choice_{x}"].append(c)
        table["data_id"].append(f"{item['question_id']}.png")
        table["data_type"].append("image")
        table["question"].append(item["question"])
        table["question_id"].append(str(item["question_id"]))
        table["question_type_id"].append(item["question_type_id"])
        table["image"].append([item["image"].convert("RGB")])
        table["segment"].append(None)
    features = datasets.Features({**{k: datasets.Value("string") for k in table if k not in ("question_type_id", "image", "segment")},
                                  "question_type_id": datasets.Value("int64"), "image": datasets.Sequence(datasets.Image()),
                                  "segment": datasets.Value("string")})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path

"""Loaders for the benchmark files users have: MME, MMBench and SEED-Bench in their real formats.

Every loader returns `(questions, problems)`: the readable questions, and one line per row that
could not be read (bad base64, missing image), naming its id — the rest is still scored.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cvlm.files import open_image, read_json, read_text
from cvlm.modeling.image_conversion import to_rgb

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MME_INSTRUCTION = "Answer the question using a single word or phrase."
LETTERS = "ABCDEFGHI"
CIRCULAR_OFFSET = 1_000_000


@dataclass
class Question:
    benchmark: str
    id: str  # unique per question (one line of predictions.jsonl)
    image: object  # a PIL image, an image path, or None
    prompt: str  # the full user prompt, instruction included
    answer: str  # the reference, as the metric takes it
    choices: list[str] = field(default_factory=list)  # option texts (multiple choice); Yes/No for MME
    fields: dict = field(default_factory=dict)  # what the metric module takes besides predictions/references
    question: str = ""  # the bare question (no options, no instruction): the context of likelihood ranking

    def load_image(self) -> Image.Image | None:
        if self.image is None:
            return None
        if isinstance(self.image, Image.Image):
            return to_rgb(self.image)
        return open_image(self.image, where=f"question {self.id}")


def _table(path: str, split: str | None):
    """Rows of a `datasets` layout: a folder of parquet files, a saved dataset, one parquet file, or a Hub id."""
    import datasets

    p = Path(path)
    if p.is_dir() and (p / "dataset_info.json").exists() or (p.is_dir() and (p / "dataset_dict.json").exists()):
        data = datasets.load_from_disk(path)
        return data[split or next(iter(data))] if isinstance(data, datasets.DatasetDict) else data
    files = sorted(p.rglob("*.parquet")) if p.is_dir() else ([p] if p.suffix == ".parquet" else [])
    if files:
        if split:
            files = [f for f in files if split in f.name] or files
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    if p.exists():
        raise ValueError(f"{path} holds no parquet files or saved dataset.")
    return datasets.load_dataset(path, split=split or "test")


def _options_block(choices: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip().lower() in ("", "nan", "none")


# ---- MME -------------------------------------------------------------------------------------------------
MME_SUBTASKS = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
                "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]


def _mme_bare(question: str) -> str:
    for tail in (" Please answer yes or no.", "  Please answer yes or no.", "Please answer yes or no."):
        if question.endswith(tail):
            return question[: -len(tail)].rstrip()
    return question


def _mme_prompt(question: str) -> str:
    return _mme_bare(question) + "\n" + MME_INSTRUCTION


def _yes_no(raw, where: str) -> str:
    answer = "" if _is_missing(raw) else str(raw).strip().rstrip(".").capitalize()
    if answer not in ("Yes", "No"):
        raise ValueError(f"{where}: answer {raw!r} is not Yes or No")
    return answer


def load_mme(path: str, split: str | None = None):
    """The original release folders (`<subtask>/questions_answers_YN/*.txt` + `images/`, or image and
    txt side by side) or the lmms-lab/MME `datasets` layout (question_id, image, question, answer,
    category)."""
    root = Path(path)
    if root.is_dir() and any(sub.is_dir() and (any(sub.glob("*.txt")) or (sub / "questions_answers_YN").is_dir())
                             for sub in root.iterdir()):
        return _load_mme_release(root)
    questions, problems, seen = [], [], {}
    for row in _table(path, split):
        qid = str(row["question_id"])
        k = seen[qid] = seen.get(qid, 0) + 1
        if row.get("image") is None:
            problems.append(f"{qid}#{k}: no image")
            continue
        try:
            answer = _yes_no(row.get("answer"), f"{qid}#{k}")
        except ValueError as error:
            problems.append(str(error))
            continue
        questions.append(Question("mme", f"{qid}#{k}", row["image"], _mme_prompt(row["question"]), answer,
                                  ["Yes", "No"], {"question_id": qid, "category": row["category"]},
                                  _mme_bare(row["question"])))
    return questions, problems


def _load_mme_release(root: Path):
    questions, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):  # one folder per subtask, named as it
        subtask = folder.name
        qa_dir = folder / "questions_answers_YN" if (folder / "questions_answers_YN").is_dir() else folder
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        for txt in sorted(qa_dir.glob("*.txt")):
            images = [p for p in image_dir.glob(txt.stem + ".*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
            qid = f"{subtask}/{txt.stem}"
            lines = [line for line in read_text(txt, "MME question file").splitlines() if line.strip()]
            if not images:
                problems.append(f"{qid}: image {txt.stem}.* not found in {image_dir}")
                continue
            for k, line in enumerate(lines, 1):
                question, _, answer = line.rpartition("\t")
                try:
                    answer = _yes_no(answer, f"{txt}, line {k}")
                except ValueError as error:
                    problems.append(f"{error} (a line is: question, a tab, Yes or No)")
                    continue
                questions.append(Question("mme", f"{qid}#{k}", str(images[0]), _mme_prompt(question.strip()),
                                          answer, ["Yes", "No"], {"question_id": qid, "category": subtask},
                                          _mme_bare(question.strip())))
    return questions, problems


# ---- MMBench ---------------------------------------------------------------------------------------------
MMBENCH_COLUMNS = ("index", "question", "A", "B", "image")


def _letter_answer(raw, choices: list[str], where: str) -> str:
    """The reference letter, upper-cased; ValueError (naming the row) when it is not one of the options."""
    answer = "" if _is_missing(raw) else str(raw).strip().upper()
    letters = LETTERS[: len(choices)]
    if answer not in letters or not answer:
        raise ValueError(f"{where}: answer {raw!r} is not one of the options {', '.join(letters)}")
    return answer


def _mmbench_question(row: dict, image) -> Question:
    index = int(row["index"])
    choices = [str(row[letter]) for letter in "ABCD" if letter in row and not _is_missing(row[letter])]
    hint = "" if _is_missing(row.get("hint")) else str(row["hint"]).strip() + "\n"
    prompt = f"{hint}{row['question']}\n{_options_block(choices)}\n{MCQ_INSTRUCTION}"
    l2 = row.get("l2-category", row.get("L2-category", row.get("l2_category", "")))
    answer = _letter_answer(row.get("answer"), choices, f"row {index}")
    return Question("mmbench", str(index), image, prompt, answer, choices,
                    {"index": index, "category": str(row.get("category", "")), "l2_category": str(l2)},
                    f"{hint}{row['question']}")


def _decode_base64_image(data: str):
    with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as handle:
        handle.load()
        return to_rgb(handle)


def _check_columns(path: str, columns, required) -> None:
    missing = [c for c in required if c not in columns]
    if "answer" not in columns:
        raise ValueError(f"{path} has no 'answer' column: this is a test split, whose answers are withheld, so "
                         "nothing can be scored here. Score the dev split (e.g. MMBench_DEV_EN.tsv).")
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(columns)}). "
                         "Give the benchmark's own file.")


def _without_broken_groups(rows: list[dict], images: dict, problems: list[str]) -> list[Question]:
    """CircularEval needs every pass of a question: a question one of whose rows cannot be read (image or
    answer) is dropped with all its circular copies, each named in `problems`."""
    questions, broken = {}, set()
    for row in rows:
        index = int(row["index"])
        group = index % CIRCULAR_OFFSET
        if images.get(index) is None:
            broken.add(group)
            continue
        try:
            questions[index] = _mmbench_question(row, images[index])
        except ValueError as error:
            problems.append(str(error))
            broken.add(group)
    for index in sorted(i for i in questions if i % CIRCULAR_OFFSET in broken):
        problems.append(f"{index}: dropped with its question {index % CIRCULAR_OFFSET}, one of whose circular passes "
                        "could not be read")
        del questions[index]
    return list(questions.values())


def load_mmbench(path: str, split: str | None = None):
    """The official TSV (base64 images; circular copies at index >= 1e6) or the lmms-lab/MMBench
    `datasets` layout."""
    problems = []
    if path.endswith(".tsv"):
        import csv

        csv.field_size_limit(1 << 30)
        text = read_text(path, "--data")
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))
        if not rows:
            raise ValueError(f"{path} has no rows: an MMBench TSV has a header line and one row per question.")
        _check_columns(path, list(rows[0]), MMBENCH_COLUMNS)
        images, kept = {}, []
        for number, row in enumerate(rows, 2):
            try:
                index = int(row["index"])
            except (TypeError, ValueError):
                problems.append(f"line {number}: index {row.get('index')!r} is not an integer")
                continue
            kept.append(row)
            data = row.get("image") or ""
            if len(data) < 64 and data.strip().isdigit():  # a circular copy may carry the original's index
                images[index] = ("copy", int(data))
                continue
            try:
                images[index] = _decode_base64_image(data)
            except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
                images[index] = None
                problems.append(f"{index}: the image is not valid base64 of an image file")
        for index, image in list(images.items()):
            if isinstance(image, tuple):
                images[index] = images.get(image[1]) if not isinstance(images.get(image[1]), tuple) else None
                if images[index] is None:
                    problems.append(f"{index}: its image refers to row {image[1]}, which has no readable image")
        return _without_broken_groups(kept, images, problems), problems
    table = _table(path, split)
    _check_columns(path, table.column_names, ("index", "question", "A", "B", "image"))
    rows, images = [], {}
    for row in table:
        rows.append(row)
        images[int(row["index"])] = row.get("image")
        if row.get("image") is None:
            problems.append(f"{row['index']}: no image")
    return _without_broken_groups(rows, images, problems), problems


# ---- SEED-Bench ------------------------------------------------------------------------------------------
def _seed_question(row: dict, image) -> Question:
    choices = [str(row[f"choice_{x}"]) for x in "abcd"]
    prompt = f"{row['question']}\n{_options_block(choices)}\n{MCQ_INSTRUCTION}"
    answer = _letter_answer(row.get("answer"), choices, f"question {row['question_id']}")
    return Question("seed_bench", str(row["question_id"]), image, prompt, answer, choices,
                    {"question_type_id": int(row["question_type_id"])}, str(row["question"]))


SEED_FIELDS = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "question_type_id",
               "data_id")


def load_seed_bench(path: str, image_folder: str | None = None, split: str | None = None):
    """The SEED-Bench JSON (`{"questions": [...]}`) + its image folder, or the lmms-lab/SEED-Bench
    `datasets` layout. Image questions only (data_type == "image")."""
    questions, problems = [], []
    if path.endswith(".json"):
        data = read_json(path, "--data")
        folder = Path(image_folder) if image_folder else Path(path).parent
        rows = data.get("questions") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"{path} is not SEED-Bench's JSON: it needs a 'questions' list.")
        for number, row in enumerate(rows):
            if not isinstance(row, dict) or row.get("data_type", "image") != "image":
                continue
            missing = [k for k in SEED_FIELDS if k not in row]
            if missing:
                problems.append(f"question #{number} ({row.get('question_id', 'no id')}): no {', '.join(missing)}")
                continue
            image = folder / str(row["data_id"])
            if not image.exists():
                problems.append(f"{row['question_id']}: image {image} not found (check --image-folder)")
                continue
            try:
                questions.append(_seed_question(row, str(image)))
            except ValueError as error:
                problems.append(str(error))
        return questions, problems
    for row in _table(path, split):
        if row.get("data_type", "image") != "image":
            continue
        images = row.get("image")
        image = images[0] if isinstance(images, list) and images else images
        if image is None:
            problems.append(f"{row['question_id']}: no image")
            continue
        try:
            questions.append(_seed_question(row, image))
        except ValueError as error:
            problems.append(str(error))
    return questions, problems


LOADERS = {"mme": load_mme, "mmbench": load_mmbench, "seed_bench": load_seed_bench}


def load_benchmark(benchmark: str, path: str, image_folder: str | None = None, split: str | None = None):
    if benchmark not in LOADERS:
        raise ValueError(f"--benchmark {benchmark!r} is unknown. Allowed values: {', '.join(LOADERS)}.")
    if not os.path.exists(path):
        if path.startswith((".", "/", "~")) or path.endswith((".tsv", ".json", ".parquet")) or path.count("/") > 1:
            raise FileNotFoundError(f"--data {path} does not exist. Give the benchmark's file or folder, or a Hub "
                                    "dataset id (org/name).")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"{path} does not exist here, and HF_HUB_OFFLINE=1 forbids reading it from the Hub.")
    if benchmark == "seed_bench":
        return load_seed_bench(path, image_folder=image_folder, split=split)
    return LOADERS[benchmark](path, split=split)

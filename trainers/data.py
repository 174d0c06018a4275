"""Training data: LLaVA-format JSON or any `datasets` dataset -> tokenized samples -> batches.

A record is `{"id", "image": path | [paths] | absent, "conversations": [{"from": "human" | "gpt" |
"system", "value": ...}, ...]}`. Prompts are built with the checkpoint's chat template, each
`<image>` expanded to the processor's `num_image_tokens`; labels keep only the assistant turns.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cvlm.files import open_image, read_json, read_jsonl, read_text
from cvlm.modeling.image_conversion import to_rgb

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """Bad training data: the message names the record and the fix."""


@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[str]  # image paths, in the order of their <image> tokens


# ---- reading records -----------------------------------------------------------------------------
def read_records(path: str, image_folder: str | None = None, image_column: str = "image",
                 conversations_column: str = "conversations", split: str = "train") -> list[dict]:
    """Records from a LLaVA JSON/JSONL file, a `datasets` folder or Hub id (with an image column
    and a conversations column). JSON image paths are resolved against `image_folder` (default: the
    file's folder); a `datasets` Image column gives PIL images, kept in memory."""
    if not os.path.exists(path) and (path.endswith((".json", ".jsonl")) or path.startswith((".", "/", "~"))):
        raise DataError(f"--data {path} does not exist.")
    if os.path.isfile(path) and path.endswith((".json", ".jsonl")):
        if not read_text(path, "--data").strip():
            raise DataError(f"{path} is empty: a LLaVA data file is a JSON list of records with 'conversations'.")
        records = read_jsonl(path, "--data") if path.endswith(".jsonl") else read_json(path, "--data")
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list) or not records:
            raise DataError(f"{path} holds no records: a LLaVA data file is a JSON list of records with 'conversations'.")
        base = Path(image_folder) if image_folder else Path(path).parent
        if image_folder and not base.is_dir():
            raise DataError(f"--image_folder {image_folder} is not a folder.")
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{path}: record #{i} is a {type(record).__name__}, not an object with 'conversations'.")
            if not isinstance(record.get("image", []), (str, list)) or (
                    isinstance(record.get("image"), list) and not all(isinstance(p, str) for p in record["image"])):
                raise DataError(f"{path}: record {record.get('id', i)!r} has an 'image' that is neither a path nor a "
                                "list of paths.")
            record.setdefault("id", str(i))
            images = record.get("image")
            if images:
                record["image"] = [str(base / p) for p in ([images] if isinstance(images, str) else images)]
        return records
    return _read_datasets(path, image_folder, image_column, conversations_column, split)


def _read_datasets(path, image_folder, image_column, conversations_column, split) -> list[dict]:
    import datasets

    if os.path.isdir(path) and not (Path(path) / "dataset_info.json").exists() and not list(Path(path).glob("*.arrow")):
        dataset = datasets.load_dataset("imagefolder", data_dir=path, split=split)
    elif os.path.isdir(path):
        dataset = datasets.load_from_disk(path)
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
    else:
        dataset = datasets.load_dataset(path, split=split)
    if len(dataset) == 0:
        raise DataError(f"{path} has no rows in split {split!r}.")
    if conversations_column not in dataset.column_names:
        raise DataError(
            f"{path} has no {conversations_column!r} column (columns: {', '.join(dataset.column_names)}): "
            "pass --conversations_column."
        )
    records = []
    for i, row in enumerate(dataset):
        conversations = row[conversations_column]
        if isinstance(conversations, str):
            conversations = json.loads(conversations)
        image = row.get(image_column)
        images = [] if image is None else (image if isinstance(image, list) else [image])
        records.append({"id": str(row.get("id", i)), "image": images, "conversations": conversations})
    return records


# ---- checking and tokenizing ---------------------------------------------------------------------
def to_messages(record: dict) -> list[dict]:
    conversations = record.get("conversations")
    rid = record.get("id")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"Record {rid!r} has no 'conversations' list: each record needs human and gpt turns.")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise DataError(f"Record {rid!r} has a turn that is not an object: each turn is "
                            '{"from": "human" | "gpt", "value": "..."}.')
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise DataError(
                f"Record {rid!r} has a turn from {turn.get('from')!r}: use 'human', 'gpt' or 'system'."
            )
        messages.append({"role": role, "content": str(turn.get("value", turn.get("content", "")))})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"Record {rid!r} has no assistant ('gpt') turn: there is nothing to learn from it.")
    return messages


def check_images(record: dict, image_token: str) -> list:
    """The record's images, checked: as many as its <image> tokens, each file present and readable."""
    rid, images = record.get("id"), list(record.get("image") or [])
    n_tokens = sum(turn.get("value", "").count(image_token) for turn in record.get("conversations", []))
    if n_tokens != len(images):
        raise DataError(
            f"Record {rid!r} has {n_tokens} {image_token} token(s) but {len(images)} image(s): put one "
            f"{image_token} in the human turns for each image (and none for text-only records)."
        )
    for image in images:
        if isinstance(image, Image.Image):
            continue
        if not os.path.exists(image):
            raise DataError(f"Record {rid!r}: image file {image} does not exist. Check --image_folder.")
        try:
            open_image(image)  # decoded in full: a truncated file fails here, not at some training step
        except ValueError as error:
            raise DataError(f"Record {rid!r}: {error}") from None
    return images


def tokenize(record: dict, processor, max_length: int) -> Sample | None:
    """Token ids and labels (assistant turns only) of one record; None when truncation at
    `max_length` would cut through its image tokens or leave no label."""
    tokenizer, template = processor.tokenizer, processor.chat_template
    messages = to_messages(record)
    images = check_images(record, processor.image_token)
    ids, labels, rendered = [], [], ""

    def add(text, learn):  # <image> expanded by the processor, as at inference
        piece = tokenizer(processor.expand_image_tokens(text), add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], chat_template=template, tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError("The chat template does not render conversations turn by turn (prefix-consistent), "
                            "so assistant turns cannot be located for the labels.")
        add(prompt[len(rendered):], learn=False)
        add(full[len(prompt):], learn=True)
        rendered = full
    if len(ids) > max_length:
        image_positions = [j for j, t in enumerate(ids) if t == processor.image_token_id]
        if image_positions and image_positions[-1] >= max_length:
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Sample(id=str(record.get("id")), input_ids=ids, labels=labels, images=images)


def tokenize_all(records: list[dict], processor, max_length: int) -> list[Sample]:
    samples, skipped = [], 0
    for record in records:
        sample = tokenize(record, processor, max_length)
        if sample is None:
            skipped += 1
        else:
            samples.append(sample)
    if skipped:
        logger.warning(
            "Skipped %d of %d samples: at --model_max_length %d, truncation would cut through their image "
            "tokens or leave no answer. Raise --model_max_length to keep them.", skipped, len(records), max_length
        )
    if not samples:
        raise DataError(f"No sample is left to train on ({skipped} skipped by truncation at {max_length} tokens).")
    return samples


# ---- dataset and batches -------------------------------------------------------------------------
class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized samples; images are loaded (or their cached features read) when a batch is made."""

    def __init__(self, samples: list[Sample], feature_cache=None):
        self.samples, self.feature_cache = samples, feature_cache

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        item = {"input_ids": sample.input_ids, "labels": sample.labels}
        if self.feature_cache is not None:
            item["vision_features"] = [self.feature_cache.get(image) for image in sample.images]
        else:
            item["images"] = [load_image(image) for image in sample.images]
        return item


def load_image(image) -> Image.Image:
    """A record's image as the processor gets it (the family's one conversion, `to_rgb`)."""
    return to_rgb(image) if isinstance(image, Image.Image) else open_image(image)


class Collator:
    """Right-padded input_ids / labels / attention_mask, plus the batch's images in order
    (pixel_values), or their cached encoder features (vision_features). Text-only samples add none."""

    def __init__(self, processor):
        self.processor = processor
        self.pad_id = processor.tokenizer.pad_token_id

    def __call__(self, items):
        width = max(len(item["input_ids"]) for item in items)
        batch = {
            "input_ids": torch.tensor([i["input_ids"] + [self.pad_id] * (width - len(i["input_ids"])) for i in items]),
            "labels": torch.tensor([i["labels"] + [IGNORE_INDEX] * (width - len(i["labels"])) for i in items]),
            "attention_mask": torch.tensor([[1] * len(i["input_ids"]) + [0] * (width - len(i["input_ids"])) for i in items]),
        }
        if "vision_features" in items[0]:
            features = [f for item in items for f in item["vision_features"]]
            if features:
                batch["vision_features"] = torch.stack(features)
        else:
            images = [image for item in items for image in item["images"]]
            if images:
                batch["pixel_values"] = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return batch

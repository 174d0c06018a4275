"""A small LLaVA-format data set made on the spot (no download): coloured pictures and "what
colour" questions, some multi-turn, plus text-only records. For smoke runs and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40)}


def write_colour_dataset(folder, n: int = 16, text_only: int = 2, multi_turn: bool = True, size: int = 40) -> str:
    """Writes folder/data.json and folder/images/*.png; returns the JSON path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = list(PALETTE)
    records = []
    for i in range(n):
        colour = names[i % len(names)]
        Image.new("RGB", (size, size), PALETTE[colour]).save(folder / "images" / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nWhat colour is the image?"}, {"from": "gpt", "value": colour}]
        if multi_turn and i % 3 == 0:
            turns += [{"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "yes" if colour == "red" else "no"}]
        records.append({"id": f"img-{i}", "image": f"images/{i}.png", "conversations": turns})
    for i in range(text_only):
        records.append({"id": f"text-{i}", "conversations": [
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": names[i % len(names)]}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return str(path)

"""The synthetic granularity benchmark: procedurally drawn pictures and questions whose three
granularities (arXiv 2410.06765) are separable by construction.

- coarse-grained perception: properties of the whole picture (background colour, shading,
  brightness);
- fine-grained perception: properties of small objects that only survive at patch resolution
  (the colour or place of the one small square, the count of small circles, a tiny digit);
- reasoning: relations between objects (left of, more of, larger than).

Every picture also carries random nuisance (background, pattern, brightness, distractors), so no
question can be answered from anything but the part of the picture it asks about. Deterministic
by seed. Written as a train split in the LLaVA JSON format (+ images) with the same prompts the
evaluation uses, and test splits in the real MME format (two yes/no questions per picture, one
Yes and one No) and the real MMBench TSV format (options with circular copies), so the real
loaders and metric modules score them. `SUBTASKS` (and `mapping.json`, written next to the
splits) say which granularity each subtask measures.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .formats import write_mme_release, write_mmbench_tsv
from .loaders import MCQ_INSTRUCTION, MME_INSTRUCTION, _options_block

SUBTASKS = {
    "background_colour": "coarse", "shading": "coarse", "brightness": "coarse",
    "object_colour": "fine", "object_location": "fine", "count": "fine", "digit": "fine",
    "left_of": "reasoning", "more": "reasoning", "larger": "reasoning",
}
# What each subtask needs from the picture, by construction (small objects sit one per 8-px cell, a
# patch of the tiny encoders): a connector that merges neighbouring cells into one token keeps the
# whole-picture answers and mixes the rest.
NEEDS = {
    "background_colour": "the whole picture", "shading": "the whole picture", "brightness": "the whole picture",
    "object_colour": "one cell (the square's colour, among distractors)",
    "object_location": "one cell (where the square is)", "count": "several cells (every small circle)",
    "digit": "one cell (a 3x5 glyph inside it)", "left_of": "two cells (where each square is)",
    "more": "several cells (every circle and square)", "larger": "two blocks (a one-cell and a 2x2-cell object)",
}
# MMBench-style ability names / L2 groups for the TSV split
L2 = {"coarse": "coarse_perception", "fine": "finegrained_perception (instance-level)", "reasoning": "relation_reasoning"}

BACKGROUNDS = {"red": (235, 190, 190), "green": (190, 230, 190), "blue": (190, 205, 240), "yellow": (240, 230, 180)}
COLOURS = {"red": (215, 35, 35), "green": (30, 165, 55), "blue": (35, 70, 215), "purple": (140, 50, 180),
           "orange": (240, 130, 20), "black": (20, 20, 20)}
SHADINGS = ("plain", "horizontal", "vertical")  # a gradient across the whole picture: survives any pooling
KINDS = ("square", "circle", "triangle", "digit")
BRIGHTNESS = ("dark", "bright")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
DIGITS = {  # 3 x 5 glyphs
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111",
}


@dataclass
class Item:
    subtask: str
    image: Image.Image
    mcq_question: str
    options: list[str]  # the right one among them
    answer: str  # the right option's text
    yes_question: str  # its answer is Yes
    no_question: str  # its answer is No
    scene: dict | None = None  # what was drawn: background, shading, brightness, objects (kind, colour, box)


@dataclass
class Difficulty:
    image_size: int = 64
    object_size: int = 6  # px at image_size; fine-grained objects stay smaller than a patch
    clutter: int = 3  # distractor objects per picture
    cell: int = 8  # px: small objects sit one per cell (the tiny encoders' patch size)


class Canvas:
    def __init__(self, rng: random.Random, d: Difficulty, background=None, shading=None, brightness=None):
        self.rng, self.d = rng, d
        self.background = background or rng.choice(list(BACKGROUNDS))
        self.shading = shading or rng.choice(SHADINGS)
        self.brightness = brightness or rng.choice(BRIGHTNESS)
        size = d.image_size
        self.image = Image.new("RGB", (size, size), BACKGROUNDS[self.background])
        self.draw = ImageDraw.Draw(self.image)
        if self.shading != "plain":  # the background darkens by up to 60 levels left to right or top to bottom
            for t in range(size):
                colour = tuple(max(0, c - 60 * t // size) for c in BACKGROUNDS[self.background])
                line = [t, 0, t, size] if self.shading == "horizontal" else [0, t, size, t]
                self.draw.line(line, fill=colour)
        self.taken: set[tuple[int, int]] = set()  # top-left corners of the cells in use
        self.objects: list[dict] = []

    def place(self, size: int, region=None) -> tuple[int, int]:
        """A free spot (top-left corner) for an object of `size`, optionally inside (x0, y0, x1, y1).
        Objects sit inside cells of `cell` px (an encoder's patch, by default) and never share one,
        so a patch sees each small object whole; bigger objects take a block of cells."""
        full, cell = self.d.image_size, self.d.cell
        span = -(-size // cell)  # cells per side
        x0, y0, x1, y1 = region or (0, 0, full, full)
        spots = [(cx, cy) for cy in range(0, full - span * cell + 1, cell) for cx in range(0, full - span * cell + 1, cell)
                 if x0 <= cx + span * cell / 2 < x1 and y0 <= cy + span * cell / 2 < y1
                 and not any((cx + i * cell, cy + j * cell) in self.taken for i in range(span) for j in range(span))]
        if not spots:
            raise ValueError(f"No free {span}x{span} block of {cell}-px cells left in a {full}-px picture: "
                             "lower Difficulty.clutter or raise image_size.")
        cx, cy = self.rng.choice(spots)
        self.taken.update((cx + i * cell, cy + j * cell) for i in range(span) for j in range(span))
        slack = span * cell - size  # centred in its block: a patch sees each kind of object drawn one way
        return cx + slack // 2, cy + slack // 2

    def shape(self, kind: str, colour: str, size: int | None = None, at=None, region=None) -> tuple[int, int]:
        size = size or self.d.object_size
        x, y = at or self.place(size, region)
        box, fill = [x, y, x + size - 1, y + size - 1], COLOURS[colour]
        if kind == "square":
            self.draw.rectangle(box, fill=fill)
        elif kind == "circle":
            self.draw.ellipse(box, fill=fill)
        else:  # triangle
            self.draw.polygon([(x + size // 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=fill)
        self.objects.append({"kind": kind, "colour": colour, "box": box})
        return x, y

    def digit(self, value: str, scale: int = 1, region=None) -> None:
        x, y = self.place(5 * scale, region)
        self.objects.append({"kind": "digit", "colour": "black", "value": value,
                             "box": [x, y, x + 3 * scale - 1, y + 5 * scale - 1]})
        for i, bit in enumerate(DIGITS[value]):
            if bit == "1":
                cx, cy = x + (i % 3) * scale, y + (i // 3) * scale
                self.draw.rectangle([cx, cy, cx + scale - 1, cy + scale - 1], fill=COLOURS["black"])

    def distractors(self, kinds=("triangle",), avoid_colours=()) -> None:
        colours = [c for c in COLOURS if c not in avoid_colours and c != "black"]
        for _ in range(self.d.clutter):
            self.shape(self.rng.choice(kinds), self.rng.choice(colours))

    def finish(self) -> Image.Image:
        factor = 0.55 if self.brightness == "dark" else 1.0
        return self.image.point(lambda v: int(v * factor))

    def scene(self) -> dict:
        return {"background": self.background, "shading": self.shading, "brightness": self.brightness,
                "objects": self.objects}


def _options(rng: random.Random, values, truth: str, n: int = 4) -> list[str]:
    others = [v for v in values if v != truth]
    rng.shuffle(others)
    options = [truth] + others[: n - 1]
    rng.shuffle(options)
    return options


def _item(rng, subtask, canvas, question, values, truth, yes_no) -> Item:
    """`yes_no(value)`: the yes/no question stating `value`."""
    wrong = rng.choice([v for v in values if v != truth])
    return Item(subtask, canvas.finish(), question, _options(rng, values, truth), truth, yes_no(truth), yes_no(wrong),
                canvas.scene())


# Coarse subtasks: a property of the whole canvas (its attribute name), asked openly and as yes/no.
COARSE = {
    "background_colour": ("background", "What colour is the background?", list(BACKGROUNDS), "Is the background {}?"),
    "shading": ("shading", "What shading does the background have?", list(SHADINGS), "Is the background shading {}?"),
    "brightness": ("brightness", "Is the picture dark or bright?", list(BRIGHTNESS), "Is the picture {}?"),
}


def _object_colour(rng: random.Random, d: Difficulty) -> Item:
    c = Canvas(rng, d)
    colour = rng.choice([k for k in COLOURS if k != "black"])
    c.distractors(("triangle", "circle"))
    c.shape("square", colour)
    return _item(rng, "object_colour", c, "What colour is the small square?", [k for k in COLOURS if k != "black"], colour,
                 lambda v: f"Is the small square {v}?")


def _object_location(rng: random.Random, d: Difficulty) -> Item:
    c = Canvas(rng, d)
    quadrant = rng.choice(QUADRANTS)
    half = d.image_size // 2
    qx, qy = (0 if "left" in quadrant else half), (0 if "top" in quadrant else half)
    c.distractors(("triangle", "circle"))
    c.shape("square", rng.choice(["red", "blue", "green"]), region=(qx + 1, qy + 1, qx + half - 1, qy + half - 1))
    return _item(rng, "object_location", c, "Where is the small square?", list(QUADRANTS), quadrant,
                 lambda v: f"Is the small square in the {v} of the picture?")


def _count(rng: random.Random, d: Difficulty) -> Item:
    c = Canvas(rng, d)
    n = rng.randint(1, 4)
    for _ in range(n):
        c.shape("circle", rng.choice(["red", "blue", "green", "purple"]))
    for _ in range(rng.randint(0, 2)):
        c.shape("triangle", rng.choice(["red", "blue", "green", "purple"]))
    return _item(rng, "count", c, "How many small circles are there?", ["1", "2", "3", "4"], str(n),
                 lambda v: f"Are there {v} small circles?")


def _digit(rng: random.Random, d: Difficulty) -> Item:
    c = Canvas(rng, d)
    value = rng.choice(list(DIGITS))
    c.distractors(("triangle", "circle"))
    c.digit(value, scale=max(1, d.object_size // 5))
    return _item(rng, "digit", c, "Which digit is written in the picture?", list(DIGITS), value,
                 lambda v: f"Is the digit {v} written in the picture?")


def _left_of(rng: random.Random, d: Difficulty) -> Item:
    c = Canvas(rng, d)
    left = rng.random() < 0.5
    half = d.image_size // 2
    red_region = (1, 1, half - 2, d.image_size - 1) if left else (half + 1, 1, d.image_size - 1, d.image_size - 1)
    blue_region = (half + 1, 1, d.image_size - 1, d.image_size - 1) if left else (1, 1, half - 2, d.image_size - 1)
    c.shape("square", "red", region=red_region)
    c.shape("square", "blue", region=blue_region)
    c.distractors(("triangle",), avoid_colours=("red", "blue"))
    truth = "left" if left else "right"
    return _item(rng, "left_of", c, "Is the red square to the left or to the right of the blue square?",
                 ["left", "right"], truth, lambda v: f"Is the red square to the {v} of the blue square?")


def _more(rng: random.Random, d: Difficulty) -> Item:
    c = Canvas(rng, d)
    a, b = rng.sample(range(1, 5), 2)
    for _ in range(a):
        c.shape("circle", rng.choice(["red", "blue", "green"]))
    for _ in range(b):
        c.shape("square", rng.choice(["red", "blue", "green"]))
    truth = "circles" if a > b else "squares"
    return _item(rng, "more", c, "Are there more circles or more squares?", ["circles", "squares"], truth,
                 lambda v: f"Are there more {v} than {'squares' if v == 'circles' else 'circles'}?")


def _larger(rng: random.Random, d: Difficulty) -> Item:
    c = Canvas(rng, d)
    small, big = d.object_size, d.object_size * 2
    circle_big = rng.random() < 0.5
    c.shape("circle", rng.choice(["red", "blue"]), size=big if circle_big else small)
    c.shape("square", rng.choice(["green", "purple"]), size=small if circle_big else big)
    c.distractors(("triangle",))
    truth = "circle" if circle_big else "square"
    return _item(rng, "larger", c, "Which is larger, the circle or the square?", ["circle", "square"], truth,
                 lambda v: f"Is the {v} larger than the {'square' if v == 'circle' else 'circle'}?")


# the subtasks that ask about something in the picture, each drawn by its own function
MAKERS = {"object_colour": _object_colour, "object_location": _object_location, "count": _count, "digit": _digit,
          "left_of": _left_of, "more": _more, "larger": _larger}


def make_item(subtask: str, rng: random.Random, d: Difficulty = Difficulty()) -> Item:
    if subtask in COARSE:
        attribute, question, values, yes_no = COARSE[subtask]
        c = Canvas(rng, d)
        c.distractors(("triangle", "circle", "square"))
        return _item(rng, subtask, c, question, values, getattr(c, attribute), yes_no.format)
    if subtask not in MAKERS:
        raise ValueError(f"Unknown synthetic subtask {subtask!r}. Allowed values: {', '.join(SUBTASKS)}.")
    return MAKERS[subtask](rng, d)


def mcq_prompt(item: Item) -> str:
    return f"{item.mcq_question}\n{_options_block(item.options)}\n{MCQ_INSTRUCTION}"


def yes_no_prompt(question: str) -> str:
    return f"{question}\n{MME_INSTRUCTION}"


def write_benchmark(folder, seed: int = 0, train_per_subtask: int = 200, test_per_subtask: int = 40,
                    difficulty: Difficulty = Difficulty(), subtasks=None, open_questions_only: bool = False) -> dict:
    """Writes train/ (LLaVA JSON + images), test_mme/ (MME release folders), test_mmbench.tsv,
    test_mmbench_blind.tsv (its questions over plain grey pictures) and mapping.json under `folder`;
    returns their paths. Train and test pictures come from
    different random streams of the same seed. `open_questions_only`: every train question is the
    open one, answered by the value (what likelihood ranking of option texts then scores)."""
    folder = Path(folder)
    subtasks = list(subtasks or SUBTASKS)
    (folder / "train" / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for subtask in subtasks:
        rng = random.Random(f"{seed}-train-{subtask}")
        for i in range(train_per_subtask):
            item = make_item(subtask, rng, difficulty)
            name = f"{subtask}-{i}.png"
            item.image.save(folder / "train" / "images" / name)
            letter = "ABCD"[item.options.index(item.answer)]
            # a quarter each: the open question (answered by the value itself, the easiest link
            # between picture and words), multiple choice, a Yes question and a No question
            question, answer = [(item.mcq_question if open_questions_only else f"{item.mcq_question}\n{MME_INSTRUCTION}",
                                 item.answer), (mcq_prompt(item), letter),
                                (yes_no_prompt(item.yes_question), "Yes"), (yes_no_prompt(item.no_question), "No")][
                                    0 if open_questions_only else i % 4]
            records.append({"id": f"{subtask}-{i}", "image": f"images/{name}", "conversations": [
                {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})
    random.Random(f"{seed}-shuffle").shuffle(records)
    (folder / "train" / "data.json").write_text(json.dumps(records))

    mme_items, mmb_items = [], []
    for subtask in subtasks:
        rng = random.Random(f"{seed}-test-{subtask}")
        for i in range(test_per_subtask):
            item = make_item(subtask, rng, difficulty)
            mme_items.append({"subtask": subtask, "name": f"{i:04d}", "image": item.image,
                              "qa": [(item.yes_question + " Please answer yes or no.", "Yes"),
                                     (item.no_question + " Please answer yes or no.", "No")]})
            mmb_items.append({"index": len(mmb_items), "question": item.mcq_question, "options": item.options,
                              "answer": "ABCD"[item.options.index(item.answer)], "category": subtask,
                              "l2_category": L2[SUBTASKS[subtask]], "image": item.image})
    write_mme_release(folder / "test_mme", mme_items)
    write_mmbench_tsv(folder / "test_mmbench.tsv", mmb_items, image_format="PNG")  # exact pixels, as trained on
    # the blind baseline: the same questions, every picture one plain grey (what text alone can answer)
    grey = [{**item, "image": Image.new("RGB", item["image"].size, (128, 128, 128))} for item in mmb_items]
    write_mmbench_tsv(folder / "test_mmbench_blind.tsv", grey, image_format="PNG")
    mapping = {"description": "The synthetic granularity benchmark's subtasks, by construction.",
               "mapping": {"mme": {s: SUBTASKS[s] for s in subtasks}, "mmbench": {s: SUBTASKS[s] for s in subtasks}}}
    (folder / "mapping.json").write_text(json.dumps(mapping, indent=2))
    return {"train": str(folder / "train" / "data.json"), "mme": str(folder / "test_mme"),
            "mmbench": str(folder / "test_mmbench.tsv"), "mmbench_blind": str(folder / "test_mmbench_blind.tsv"),
            "mapping": str(folder / "mapping.json")}

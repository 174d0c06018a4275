"""MME: two yes/no questions per image; acc, acc+ and score = 100*acc + 100*acc+ per subtask."""

from collections import defaultdict

import datasets
import evaluate

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]

_DESCRIPTION = """MME (arXiv 2306.13394) scored as the official eval_tool and lmms-eval do. Each image has two
yes/no questions. Per subtask: acc (questions right), acc+ (images with both right) and score = 100*acc + 100*acc+
(max 200). Perception sums the 10 perception subtasks (max 2000), cognition the 4 cognition subtasks (max 800).
Answers are parsed like lmms-eval: lower-case, dots removed, exact yes/no, "y"/"n", else yes/no within the first 4
characters, else "other" (counted wrong and reported)."""

_KWARGS = """
Args:
    predictions: the model's raw answers.
    references: "Yes" / "No".
    question_id: the image id shared by the two questions of an image (lmms-lab/MME's `question_id`).
    category: the subtask, spelled as MME spells it (`OCR`, `commonsense_reasoning`, ...).
Returns:
    perception_score, cognition_score, total_score, subtasks ({name: {acc, acc_plus, score, num_questions}}),
    other (how many answers were neither yes nor no), other_ids.
"""

_CITATION = """@article{fu2023mme, title={MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language
Models}, author={Fu, Chaoyou and others}, journal={arXiv preprint arXiv:2306.13394}, year={2023}}"""


def parse_yes_no(prediction: str) -> str:
    text = str(prediction).lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if text in ("y", "n"):
        return "yes" if text == "y" else "no"
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MME(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Value("string"), "references": datasets.Value("string"),
                "question_id": datasets.Value("string"), "category": datasets.Value("string"),
            }),
            reference_urls=["https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation"],
        )

    def _compute(self, predictions, references, question_id, category):
        images = defaultdict(list)  # (category, image) -> [right?]
        other_ids = []
        for prediction, reference, qid, cat in zip(list(predictions), list(references), list(question_id), list(category)):
            parsed = parse_yes_no(prediction)
            if parsed == "other":
                other_ids.append(qid)
            truth = str(reference).lower().strip()
            if truth not in ("yes", "no"):
                raise ValueError(f"MME reference {reference!r} (question_id {qid!r}) is not Yes or No.")
            images[(cat, qid)].append(parsed == truth)
        subtasks = defaultdict(lambda: {"right": 0, "questions": 0, "images_both": 0, "images": 0})
        for (cat, qid), hits in images.items():
            s = subtasks[cat]
            s["right"] += sum(hits)
            s["questions"] += len(hits)
            s["images"] += 1
            s["images_both"] += int(all(hits) and len(hits) == 2)
        result = {}
        for cat, s in sorted(subtasks.items()):
            acc, acc_plus = s["right"] / s["questions"], s["images_both"] / s["images"]
            result[cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
                           "num_questions": s["questions"], "num_images": s["images"]}
        perception = sum(result[c]["score"] for c in PERCEPTION if c in result)
        cognition = sum(result[c]["score"] for c in COGNITION if c in result)
        return {"perception_score": perception, "cognition_score": cognition, "total_score": perception + cognition,
                "subtasks": result, "other": len(other_ids), "other_ids": other_ids}

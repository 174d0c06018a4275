"""SEED-Bench (image): accuracy overall and per evaluation dimension."""

from collections import defaultdict

import datasets
import evaluate

DIMENSIONS = {
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding",
}

_DESCRIPTION = """SEED-Bench (arXiv 2307.16125): accuracy over questions and per evaluation dimension, keyed on
`question_type_id` (names as SEED-Bench spells them; dimensions 1-9 are the image ones). A prediction is either a
generated answer, read like lmms-eval (stripped; its first character when longer; compared case-insensitively), or
a letter from likelihood ranking."""

_KWARGS = """
Args:
    predictions: generated answers or ranked letters.
    references: the right letter (A-D).
    question_type_id: SEED-Bench's dimension id.
Returns:
    accuracy, num_questions, per_dimension ({name: {accuracy, num_questions}}).
"""

_CITATION = """@article{li2023seed, title={SEED-Bench: Benchmarking Multimodal LLMs with Generative
Comprehension}, author={Li, Bohao and others}, journal={arXiv preprint arXiv:2307.16125}, year={2023}}"""


def parse_letter(prediction: str) -> str:
    text = str(prediction).strip()
    return (text[0] if len(text) > 1 else text).upper()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class SEEDBench(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Value("string"), "references": datasets.Value("string"),
                "question_type_id": datasets.Value("int64"),
            }),
            reference_urls=["https://github.com/AILab-CVC/SEED-Bench"],
        )

    def _compute(self, predictions, references, question_type_id):
        per = defaultdict(lambda: [0, 0])
        for pred, ref, qtype in zip(list(predictions), list(references), list(question_type_id)):
            right = parse_letter(pred) == str(ref).strip().upper()
            name = DIMENSIONS.get(int(qtype), f"dimension {qtype}")
            per[name][0] += right
            per[name][1] += 1
        hits, total = sum(h for h, _ in per.values()), sum(n for _, n in per.values())
        return {"accuracy": hits / total, "num_questions": total,
                "per_dimension": {k: {"accuracy": h / n, "num_questions": n} for k, (h, n) in sorted(per.items())}}

"""MMBench: CircularEval and single-pass accuracy, per ability (category) and per L2 group."""

from collections import defaultdict

import datasets
import evaluate

LETTERS = "ABCDEFGHI"
CIRCULAR_OFFSET = 1_000_000

_DESCRIPTION = """MMBench (arXiv 2307.06281) scored without an LLM judge. CircularEval: a question with n options
is asked n times with its options circularly shifted (rows with index >= 1e6 are the shifted copies of index mod
1e6); it counts only if every pass is right. Single-pass accuracy uses the rows with index < 1e6. The option is
extracted from the raw answer by, in order: a lone option letter among the answer's words; a letter in a common
wrapper ("(B)", "B.", "B:", "B)", ...); a unique option text contained in the answer. Answers none of these
resolve are counted as unparseable (and wrong)."""

_KWARGS = """
Args:
    predictions: the model's raw answers.
    references: the right option's letter.
    index: MMBench's row index (circular copies at index + k*1e6).
    category: the ability (one of the 20 MMBench categories).
    l2_category: the L2 group (`coarse_perception`, `finegrained_perception (instance-level)`, ...).
    choices: the row's option texts in A, B, C, D order (as many as the row has).
Returns:
    circular_accuracy, single_pass_accuracy, per_category and per_l2_category ({name: {circular, single_pass,
    num_questions}}), unparseable (count) and unparseable_indices.
"""

_CITATION = """@article{liu2023mmbench, title={MMBench: Is Your Multi-modal Model an All-around Player?},
author={Liu, Yuan and others}, journal={arXiv preprint arXiv:2307.06281}, year={2023}}"""

WRAPPERS = ["{}.", "{},", "{}:", "{})", "{}).", "({})", "({}).", ":{}", ":{},", ":{}.", ":{})", ":{})."]


def extract_option(prediction: str, choices: list) -> str | None:
    """The option letter a raw answer gives, or None."""
    letters = LETTERS[: len(choices)]
    words = [w.strip() for w in str(prediction).split()]
    bare = {w for w in words if w in letters}
    if len(bare) == 1:
        return bare.pop()
    wrapped = {c for c in letters for w in words if any(w == pattern.format(c) for pattern in WRAPPERS)}
    if len(wrapped) == 1:
        return wrapped.pop()
    text = str(prediction).lower()
    inside = [letters[i] for i, choice in enumerate(choices) if choice and str(choice).lower() in text]
    if len(inside) == 1:
        return inside[0]
    return None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MMBench(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Value("string"), "references": datasets.Value("string"),
                "index": datasets.Value("int64"), "category": datasets.Value("string"),
                "l2_category": datasets.Value("string"), "choices": datasets.Sequence(datasets.Value("string")),
            }),
            reference_urls=["https://github.com/open-compass/MMBench"],
        )

    def _compute(self, predictions, references, index, category, l2_category, choices):
        groups = defaultdict(list)  # question -> [right?] over its circular passes
        meta, unparseable = {}, []
        for pred, ref, idx, cat, l2, opts in zip(list(predictions), list(references), list(index), list(category),
                                                 list(l2_category), list(choices)):
            letter = extract_option(pred, [o for o in opts if o is not None and str(o) != "nan"])
            if letter is None:
                unparseable.append(int(idx))
            question = int(idx) % CIRCULAR_OFFSET
            groups[question].append(letter == str(ref).strip())
            if int(idx) < CIRCULAR_OFFSET:
                meta[question] = (cat, l2, letter == str(ref).strip())
        missing = sorted(set(groups) - set(meta))
        if missing:
            raise ValueError(f"MMBench rows {missing[:5]} have circular copies but no original row (index < 1e6).")
        per_cat, per_l2 = defaultdict(lambda: [0, 0, 0]), defaultdict(lambda: [0, 0, 0])
        circular_hits = single_hits = 0
        for question, (cat, l2, single) in meta.items():
            circular = all(groups[question])
            circular_hits += circular
            single_hits += single
            for table, key in ((per_cat, cat), (per_l2, l2)):
                table[key][0] += circular
                table[key][1] += single
                table[key][2] += 1

        def summary(table):
            return {k: {"circular": c / n, "single_pass": s / n, "num_questions": n} for k, (c, s, n) in sorted(table.items())}

        n = len(meta)
        return {"circular_accuracy": circular_hits / n, "single_pass_accuracy": single_hits / n, "num_questions": n,
                "per_category": summary(per_cat), "per_l2_category": summary(per_l2),
                "unparseable": len(unparseable), "unparseable_indices": unparseable}

"""Regroups benchmark subtasks into coarse-grained perception / fine-grained perception / reasoning."""

import json
from collections import defaultdict

import datasets
import evaluate

GRANULARITIES = ("coarse", "fine", "reasoning")

_DESCRIPTION = """The granularity breakdown of arXiv 2410.06765 ("To Preserve or To Compress"): each subtask of a
benchmark is assigned to coarse-grained perception, fine-grained perception or reasoning by a mapping file
(connector-vlm ships eval/granularity_mapping.json: {"mapping": {benchmark: {subtask: granularity}}}). Scores are
put in % first: an MME subtask score (0-200, acc + acc+) is halved, accuracies (0-1) are multiplied by 100. Per
granularity it reports macro (the mean over subtasks) and micro (weighted by the subtasks' question counts)."""

_KWARGS = """
Args:
    benchmark: per row, the benchmark name as in the mapping file (mme, mmbench, seed_bench, ...).
    subtask: per row, the subtask name (MME category, MMBench ability, SEED-Bench dimension name, ...).
    score: per row, the subtask's score in the benchmark's own unit (MME: 0-200; others: accuracy 0-1).
    num_questions: per row, how many questions the subtask score covers.
    mapping_file: path of the mapping JSON.
Returns:
    {coarse, fine, reasoning: {macro, micro, num_subtasks, num_questions, subtasks: {benchmark/subtask: %}}},
    unmapped (benchmark/subtask rows the mapping does not cover).
"""

_CITATION = """@inproceedings{lin2024preserve, title={To Preserve or To Compress: An In-Depth Study of Connector
Selection in Multimodal Large Language Models}, author={Lin, Junyan and others}, booktitle={EMNLP}, year={2024}}"""


def to_percent(benchmark: str, score: float) -> float:
    return score / 2 if benchmark == "mme" else 100 * score


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Granularity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({
                "benchmark": datasets.Value("string"), "subtask": datasets.Value("string"),
                "score": datasets.Value("float64"), "num_questions": datasets.Value("int64"),
            }),
        )

    def _compute(self, benchmark, subtask, score, num_questions, mapping_file=None):
        if mapping_file is None:
            raise ValueError("Pass mapping_file=: connector-vlm ships eval/granularity_mapping.json.")
        with open(mapping_file) as handle:
            mapping = json.load(handle)["mapping"]
        groups = defaultdict(dict)
        unmapped = []
        for bench, sub, value, n in zip(list(benchmark), list(subtask), list(score), list(num_questions)):
            granularity = mapping.get(bench, {}).get(sub)
            if granularity is None:
                unmapped.append(f"{bench}/{sub}")
                continue
            if granularity not in GRANULARITIES:
                raise ValueError(f"{mapping_file}: {bench}/{sub} maps to {granularity!r}; allowed: {', '.join(GRANULARITIES)}.")
            groups[granularity][f"{bench}/{sub}"] = (to_percent(bench, float(value)), int(n))
        result = {}
        for granularity in GRANULARITIES:
            rows = groups.get(granularity, {})
            total = sum(n for _, n in rows.values())
            result[granularity] = {
                "macro": sum(v for v, _ in rows.values()) / len(rows) if rows else None,
                "micro": sum(v * n for v, n in rows.values()) / total if total else None,
                "num_subtasks": len(rows), "num_questions": total,
                "subtasks": {k: v for k, (v, _) in sorted(rows.items())},
            }
        result["unmapped"] = unmapped
        return result

"""Paired comparisons of groups of runs over the same questions: the statistics behind the verdicts.

Every run of a study answers the same questions, so two groups of runs (the preserving and the
compressing family, or two connectors) are compared question by question: for each question and
seed, the share of the group's runs that answered it right, and the difference between the groups.
The difference is averaged per granularity and then over the granularities asked for (so that each
granularity weighs the same, as the study's macro scores do).

- Confidence intervals: a bootstrap that resamples seeds, and questions within each granularity
  (a fixed generator: the same runs give the same interval).
- p-value: a paired sign-flip permutation test of "no difference" on the per-question differences.
- Equivalence ("comparable"): two one-sided tests with margin `EQUIVALENCE_MARGIN`, i.e. the 90 %
  interval inside (-margin, +margin).
- Power: how many questions a difference of `POWER_EFFECT` points needs at alpha 0.05 and power 0.8,
  from the spread of the per-question differences (the normal approximation of a paired t-test, as
  lmms-eval's power analysis does).
"""

from __future__ import annotations

import math
import random
import statistics

BOOTSTRAP = 2000
PERMUTATIONS = 2000
EQUIVALENCE_MARGIN = 5.0  # percentage points: differences inside it count as "comparable"
POWER_EFFECT = 5.0  # percentage points: the difference the power line is about
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided alpha 0.05, power 0.8


def per_question(rows: list[dict], granularities) -> dict[int, dict[str, tuple[str, float]]]:
    """seed -> question -> (granularity, share of the rows with that seed that answered it right), for the
    questions of `granularities` every row answered."""
    by_seed: dict[int, dict[str, list]] = {}
    for row in rows:
        table = by_seed.setdefault(row["seed"], {})
        for question, (granularity, right) in row.get("questions", {}).items():
            if granularity in granularities:
                table.setdefault(question, [granularity, []])[1].append(float(right))
    return {seed: {q: (g, statistics.fmean(v)) for q, (g, v) in table.items()} for seed, table in by_seed.items()}


def differences(a: list[dict], b: list[dict], granularities) -> dict[str, dict[str, dict[int, float]]]:
    """granularity -> question -> seed -> (share right in `a`) - (share right in `b`), in points, over the
    seeds and questions both groups have."""
    return contrast_values([(1.0, a), (-1.0, b)], granularities)


def contrast_values(terms: list[tuple[float, list[dict]]], granularities) -> dict[str, dict[str, dict[int, float]]]:
    """granularity -> question -> seed -> the weighted sum of the groups' shares right, in points, over the
    seeds and questions every group has. [(1, a), (-1, b)] is a - b; [(2, b), (-1, a), (-1, c)] is how much
    the step from a to b gains more than the step from b to c."""
    tables = [(weight, per_question(rows, granularities)) for weight, rows in terms]
    seeds = set.intersection(*(set(table) for _, table in tables))
    out: dict[str, dict[str, dict[int, float]]] = {}
    for seed in sorted(seeds):
        for question in sorted(set.intersection(*(set(table[seed]) for _, table in tables))):
            granularity = tables[0][1][seed][question][0]
            value = 100 * sum(weight * table[seed][question][1] for weight, table in tables)
            out.setdefault(granularity, {}).setdefault(question, {})[seed] = value
    return out


def _statistic(diffs: dict[str, dict[str, dict[int, float]]], seeds: list[int], picks: dict[str, list[str]]) -> float:
    means = []
    for granularity, questions in picks.items():
        values = [diffs[granularity][q][s] for q in questions for s in seeds if s in diffs[granularity][q]]
        if values:
            means.append(statistics.fmean(values))
    return statistics.fmean(means) if means else float("nan")


def compare(a: list[dict], b: list[dict], granularities, seed: int = 0) -> dict:
    """The difference a - b in points (macro over `granularities`), its 95 % and 90 % bootstrap intervals,
    the sign-flip p-value, the equivalence test and the questions a 5-point difference needs."""
    return contrast([(1.0, a), (-1.0, b)], granularities, seed)


def contrast(terms: list[tuple[float, list[dict]]], granularities, seed: int = 0) -> dict:
    """`compare` for any weighted sum of groups (see `contrast_values`)."""
    diffs = contrast_values(terms, granularities)
    if not diffs:
        return {"n_questions": 0, "difference": float("nan")}
    seeds = sorted({s for questions in diffs.values() for per_seed in questions.values() for s in per_seed})
    questions = {g: sorted(q) for g, q in diffs.items()}
    observed = _statistic(diffs, seeds, questions)
    rng = random.Random(seed)
    boot = []
    for _ in range(BOOTSTRAP):
        drawn_seeds = [rng.choice(seeds) for _ in seeds]
        drawn = {g: [rng.choice(qs) for _ in qs] for g, qs in questions.items()}
        boot.append(_statistic(diffs, drawn_seeds, drawn))
    boot.sort()

    def quantile(p: float) -> float:
        return boot[min(len(boot) - 1, max(0, round(p * (len(boot) - 1))))]

    # sign flips of each question's difference (its mean over seeds): the null of no difference
    unit = {g: {q: statistics.fmean(diffs[g][q].values()) for q in qs} for g, qs in questions.items()}
    weights = {g: 1 / (len(qs) * len(questions)) for g, qs in questions.items()}
    flat = [(weights[g], value) for g, values in unit.items() for value in values.values()]
    extreme = 0
    for _ in range(PERMUTATIONS):
        flipped = sum(w * v * (1 if rng.random() < 0.5 else -1) for w, v in flat)
        extreme += abs(flipped) >= abs(observed) - 1e-12
    p_value = (extreme + 1) / (PERMUTATIONS + 1)
    low90, high90 = quantile(0.05), quantile(0.95)
    spread = statistics.pstdev([v for values in unit.values() for v in values.values()])
    needed = math.ceil(((Z_ALPHA + Z_POWER) * spread / POWER_EFFECT) ** 2) if spread > 0 else 0
    return {"difference": observed, "ci95": (quantile(0.025), quantile(0.975)), "ci90": (low90, high90),
            "p_value": p_value, "equivalent": -EQUIVALENCE_MARGIN < low90 and high90 < EQUIVALENCE_MARGIN,
            "n_questions": sum(len(qs) for qs in questions.values()), "n_seeds": len(seeds),
            "questions_for_5_points": needed}


def describe(result: dict, name: str) -> str:
    if not result.get("n_questions"):
        return f"{name}: no question answered by both groups"
    low, high = result["ci95"]
    return (f"{name}: {result['difference']:+.1f} points, 95 % CI [{low:+.1f}, {high:+.1f}], p = {result['p_value']:.3f} "
            f"({result['n_questions']} questions x {result['n_seeds']} seeds; a 5-point difference needs "
            f"{result['questions_for_5_points']} questions)")


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation of the values that are numbers (None and NaN left out);
    (nan, nan) for none, sd 0 for one."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

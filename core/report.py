"""The study's verdicts on the claims of arXiv 2410.06765, decided from the numbers alone.

A run row (what `cvlm study` records per trained and scored model) carries at least: connector,
family, tokens (Q), resolution, seed, scores {coarse, fine, reasoning} in %, train_samples_per_s
and prefill_ms. Each claim gets "reproduced", "not reproduced" or "inconclusive", with the means,
the spread over seeds and the margin that decided it.
"""

from __future__ import annotations

import math
import statistics

GRANULARITIES = ("coarse", "fine", "reasoning")
MIN_MARGIN = 2.0  # percentage points: differences below this are never called a difference
SPEED_MARGIN = 0.10  # 10 %: speed differences below this are never called a difference


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _seed_means(rows: list[dict], key) -> list[float]:
    """One value per (connector, resolution): the mean over its seeds (seeds are not independent samples
    of the family, connectors are)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        value = key(r)
        if value is not None:
            groups.setdefault((r["connector"], r["resolution"]), []).append(value)
    return [statistics.fmean(v) for v in groups.values()]


def _seed_sd(rows: list[dict], key) -> float:
    """The typical spread over seeds of one connector at one resolution (pooled standard deviation)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["connector"], r["resolution"]), []).append(key(r))
    spreads = [statistics.variance(v) for v in groups.values() if len(v) > 1]
    return math.sqrt(statistics.fmean(spreads)) if spreads else 0.0


def margin_for(rows: list[dict], key) -> float:
    """Twice the spread over seeds, at least MIN_MARGIN; infinite with one seed (no spread to judge by),
    which leaves every score claim inconclusive."""
    seeds = {}
    for r in rows:
        seeds.setdefault((r["connector"], r["resolution"]), set()).add(r.get("seed"))
    if not any(len(s) > 1 for s in seeds.values()):
        return math.inf
    return max(MIN_MARGIN, 2 * _seed_sd(rows, key))


def _fmt(mean: float, sd: float) -> str:
    return "no runs" if math.isnan(mean) else f"{mean:.1f} ± {sd:.1f}"


def _margin(margin: float) -> str:
    return "no margin: one seed has no spread to judge by" if math.isinf(margin) else f"margin {margin:.1f}"


def verdict_family_gap(rows: list[dict], granularity: str) -> dict:
    """Preserving minus compressing on one granularity."""
    key = lambda r: r["scores"].get(granularity)  # noqa: E731
    preserving = _seed_means([r for r in rows if r["family"] == "preserving"], key)
    compressing = _seed_means([r for r in rows if r["family"] == "compressing"], key)
    (p, p_sd), (c, c_sd) = _mean_sd(preserving), _mean_sd(compressing)
    return {"preserving": p, "preserving_sd": p_sd, "compressing": c, "compressing_sd": c_sd,
            "difference": p - c, "margin": margin_for(rows, key), "n": (len(preserving), len(compressing))}


def claim_fine_grained(rows: list[dict]) -> dict:
    gap = verdict_family_gap(rows, "fine")
    if not all(gap["n"]) or math.isnan(gap["difference"]):
        verdict = "inconclusive"
    elif gap["difference"] > gap["margin"]:
        verdict = "reproduced"
    elif gap["difference"] < -gap["margin"]:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return {"claim": "Feature-preserving connectors beat compressing ones on fine-grained perception.",
            "verdict": verdict, "evidence": (
                f"fine-grained: preserving {_fmt(gap['preserving'], gap['preserving_sd'])} vs compressing "
                f"{_fmt(gap['compressing'], gap['compressing_sd'])} % (difference {gap['difference']:+.1f}, "
                f"{_margin(gap['margin'])})")}


def claim_comparable(rows: list[dict]) -> dict:
    gaps = {g: verdict_family_gap(rows, g) for g in ("coarse", "reasoning")}
    if any(not all(gap["n"]) or math.isnan(gap["difference"]) for gap in gaps.values()):
        verdict = "inconclusive"
    elif any(abs(gap["difference"]) > gap["margin"] for gap in gaps.values()):
        verdict = "not reproduced"
    elif all(gap["margin"] <= 2 * MIN_MARGIN for gap in gaps.values()):
        verdict = "reproduced"  # close, and the seeds agree enough to tell
    else:
        verdict = "inconclusive"  # close, but the seeds scatter too much to call it
    evidence = "; ".join(f"{g}: preserving {_fmt(x['preserving'], x['preserving_sd'])} vs compressing "
                         f"{_fmt(x['compressing'], x['compressing_sd'])} % (difference {x['difference']:+.1f}, "
                         f"{_margin(x['margin'])})" for g, x in gaps.items())
    return {"claim": "Compressing connectors are comparable on coarse-grained perception and reasoning.",
            "verdict": verdict, "evidence": evidence}


def claim_faster(rows: list[dict]) -> dict:
    out = {}
    for name, key, higher_is_faster in (("training samples/s", "train_samples_per_s", True),
                                        ("prefill latency (ms)", "prefill_ms", False)):
        p = _mean_sd(_seed_means([r for r in rows if r["family"] == "preserving"], lambda r: r.get(key)))[0]
        c = _mean_sd(_seed_means([r for r in rows if r["family"] == "compressing"], lambda r: r.get(key)))[0]
        out[name] = (p, c, (c / p) if higher_is_faster else (p / c))
    speedups = [s for _, _, s in out.values()]
    if any(math.isnan(s) for s in speedups):
        verdict = "inconclusive"
    elif all(s > 1 + SPEED_MARGIN for s in speedups):
        verdict = "reproduced"
    elif any(s < 1 for s in speedups):
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    evidence = "; ".join(f"{name}: preserving {p:.1f}, compressing {c:.1f} ({s:.2f}x in favour of compressing)"
                         for name, (p, c, s) in out.items())
    return {"claim": "Compressing connectors train and answer faster.", "verdict": verdict,
            "evidence": evidence + f" (margin {100 * SPEED_MARGIN:.0f} %)"}


def claim_ranking(rows: list[dict]) -> dict:
    key = lambda r: statistics.fmean(r["scores"][g] for g in GRANULARITIES)  # noqa: E731
    stats = {name: _mean_sd(_seed_means([r for r in rows if r["connector"].startswith(name)], key))
             for name in ("avgpool", "cabstractor", "qformer")}
    margin = margin_for([r for r in rows if r["connector"].split("-")[0] in stats], key)
    (a, _), (c, _), (q, _) = stats["avgpool"], stats["cabstractor"], stats["qformer"]
    if any(math.isnan(v) for v in (a, c, q)):
        verdict = "inconclusive"
    elif abs(a - c) <= margin and min(a, c) - q > margin:
        verdict = "reproduced"
    elif q - max(a, c) > margin or abs(a - c) > 2 * margin:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    evidence = ", ".join(f"{name} {_fmt(m, s)}" for name, (m, s) in stats.items())
    return {"claim": "Average pooling ≈ C-Abstractor > Q-Former (mean over the three granularities).",
            "verdict": verdict, "evidence": f"{evidence} % ({_margin(margin)})"}


def claim_resolution(rows: list[dict]) -> dict:
    resolutions = sorted({r["resolution"] for r in rows})
    if len(resolutions) < 3:
        return {"claim": "Returns diminish with resolution.", "verdict": "inconclusive",
                "evidence": f"needs 3 resolutions, the study has {len(resolutions)}"}
    key = lambda r: statistics.fmean(r["scores"][g] for g in GRANULARITIES)  # noqa: E731
    means = [_mean_sd(_seed_means([r for r in rows if r["resolution"] == res], key))[0] for res in resolutions[:3]]
    first, second = means[1] - means[0], means[2] - means[1]
    margin = margin_for(rows, key)
    if first > margin and first - second > margin:
        verdict = "reproduced"
    elif second - first > margin or first < -margin:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return {"claim": "Returns diminish with resolution.", "verdict": verdict,
            "evidence": f"mean score at {', '.join(map(str, resolutions[:3]))} px: "
                        f"{', '.join(f'{m:.1f}' for m in means)} % (gains {first:+.1f} then {second:+.1f}, "
                        f"{_margin(margin)})"}


CLAIMS = (claim_fine_grained, claim_comparable, claim_faster, claim_ranking, claim_resolution)
LEARNT_MARGIN = 15.0  # percentage points above chance that the best connector must reach for "learnt"
USES = {claim_fine_grained: ("fine",), claim_comparable: ("coarse", "reasoning"), claim_ranking: GRANULARITIES,
        claim_resolution: GRANULARITIES}


def learnt(rows: list[dict], chance: dict) -> dict:
    """Per granularity: the best (connector, resolution) by its mean over seeds, its score, chance,
    and whether it is at least LEARNT_MARGIN above chance."""
    out = {}
    for g in GRANULARITIES:
        groups: dict[tuple, list[float]] = {}
        for r in rows:
            if r["scores"].get(g) is not None:
                groups.setdefault((r["connector"], r["resolution"]), []).append(r["scores"][g])
        if not groups or g not in chance:
            continue
        (connector, resolution), values = max(groups.items(), key=lambda kv: statistics.fmean(kv[1]))
        best = statistics.fmean(values)
        out[g] = {"connector": connector, "resolution": resolution, "best": best, "chance": chance[g],
                  "learnt": best - chance[g] >= LEARNT_MARGIN}
    return out


def verdicts(rows: list[dict], chance: dict | None = None) -> list[dict]:
    """Each claim's verdict. With `chance` (per granularity), a claim that rests on a granularity no
    connector learnt is inconclusive whatever the differences: they would be noise around chance."""
    state = learnt(rows, chance) if chance else {}
    out = []
    for claim in CLAIMS:
        result = claim(rows)
        unlearnt = [g for g in USES.get(claim, ()) if g in state and not state[g]["learnt"]]
        if unlearnt:
            result = {**result, "verdict": "inconclusive"}
            result["evidence"] = (f"no connector learnt {' or '.join(unlearnt)} (best "
                                  + ", ".join(f"{state[g]['best']:.1f} vs chance {state[g]['chance']:.1f}" for g in unlearnt)
                                  + f", {LEARNT_MARGIN:.0f} points above chance needed); " + result["evidence"])
        out.append(result)
    return out

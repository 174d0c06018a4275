"""The study's verdicts on the claims of arXiv 2410.06765, decided from the numbers alone.

A run row (what `cvlm study` records per trained and scored model) carries at least: connector,
family, tokens (Q), resolution, seed, scores {coarse, fine, reasoning} in %, train_samples_per_s
and prefill_ms, and, from `cvlm study`, `questions` ({question: [granularity, right]}). Each claim
gets "reproduced", "not reproduced" or "inconclusive" with its evidence. Score claims are decided by
paired comparisons over questions and seeds (`cvlm.paired`: bootstrap intervals, a permutation
p-value, an equivalence test); rows without per-question outcomes fall back to a margin of twice
the spread over seeds. The speed claim is decided by the quiet timing phase when there is one.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from cvlm.paired import EQUIVALENCE_MARGIN, compare, contrast, describe, mean_sd
from cvlm.files import write_atomic
from cvlm.eval import GRANULARITIES

MIN_MARGIN = 2.0  # percentage points: differences below this are never called a difference
SPEED_MARGIN = 0.10  # 10 %: speed differences below this are never called a difference


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
    (p, p_sd), (c, c_sd) = mean_sd(preserving), mean_sd(compressing)
    return {"preserving": p, "preserving_sd": p_sd, "compressing": c, "compressing_sd": c_sd,
            "difference": p - c, "margin": margin_for(rows, key), "n": (len(preserving), len(compressing))}


def _has_questions(rows: list[dict]) -> bool:
    return bool(rows) and all(r.get("questions") for r in rows)


def _family(rows: list[dict], family: str) -> list[dict]:
    return [r for r in rows if r["family"] == family]


def _means(rows: list[dict], granularity: str) -> str:
    key = lambda r: r["scores"].get(granularity)  # noqa: E731
    return " vs ".join(f"{family} {_fmt(*mean_sd(_seed_means(_family(rows, family), key)))} %"
                       for family in ("preserving", "compressing"))


def claim_fine_grained(rows: list[dict]) -> dict:
    claim = "Feature-preserving connectors beat compressing ones on fine-grained perception."
    if _has_questions(rows):
        result = compare(_family(rows, "preserving"), _family(rows, "compressing"), ("fine",))
        if not result.get("n_questions"):
            verdict = "inconclusive"
        elif result["ci95"][0] > 0:
            verdict = "reproduced"
        elif result["ci95"][1] < 0:
            verdict = "not reproduced"
        else:
            verdict = "inconclusive"
        return {"claim": claim, "verdict": verdict, "statistics": {"fine": result},
                "evidence": f"{_means(rows, 'fine')}; " + describe(result, "preserving - compressing, fine")}
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
    claim = "Compressing connectors are comparable on coarse-grained perception and reasoning."
    if _has_questions(rows):
        results = {g: compare(_family(rows, "preserving"), _family(rows, "compressing"), (g,))
                   for g in ("coarse", "reasoning")}
        if any(not r.get("n_questions") for r in results.values()):
            verdict = "inconclusive"
        elif all(r["equivalent"] for r in results.values()):
            verdict = "reproduced"
        elif any((r["ci95"][0] > 0 or r["ci95"][1] < 0) and abs(r["difference"]) >= EQUIVALENCE_MARGIN
                 for r in results.values()):
            verdict = "not reproduced"
        else:
            verdict = "inconclusive"
        evidence = "; ".join(f"{_means(rows, g)} on {g}; " + describe(r, f"preserving - compressing, {g}")
                             + f", {'within' if r.get('equivalent') else 'not within'} the ±{EQUIVALENCE_MARGIN:.0f}-point "
                             "equivalence margin (90 % CI)" for g, r in results.items())
        return {"claim": claim, "verdict": verdict, "statistics": results, "evidence": evidence}
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


def claim_faster_timed(timing: list[dict]) -> dict:
    """From the quiet timing phase: per resolution, the preserving family's median training step and
    prefill over the compressing family's; the verdict needs both above 1 + SPEED_MARGIN."""
    ratios = {"training step": [], "prefill": []}
    for resolution in sorted({t["resolution"] for t in timing}):
        at = [t for t in timing if t["resolution"] == resolution]
        for name, key in (("training step", "train_step_ms"), ("prefill", "prefill_ms")):
            p = [t[key] for t in at if t["family"] == "preserving"]
            c = [t[key] for t in at if t["family"] == "compressing"]
            if p and c:
                ratios[name].append(statistics.fmean(p) / statistics.fmean(c))
    speedups = {k: math.exp(statistics.fmean(math.log(v) for v in vs)) if vs else float("nan")
                for k, vs in ratios.items()}
    if any(math.isnan(s) for s in speedups.values()):
        verdict = "inconclusive"
    elif all(s > 1 + SPEED_MARGIN for s in speedups.values()):
        verdict = "reproduced"
    elif any(s < 1 for s in speedups.values()):
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    tokens = {f: statistics.fmean(t["tokens"] for t in timing if t["family"] == f) for f in ("preserving", "compressing")
              if any(t["family"] == f for t in timing)}
    flops = {f: statistics.fmean(t["train_flops_per_sample"] for t in timing if t["family"] == f) for f in tokens}
    evidence = "; ".join(f"{name}: no resolution has runs of both families" if math.isnan(s) else
                         f"{name}: {s:.2f}x in favour of compressing (geometric mean over resolutions)"
                         for name, s in speedups.items())
    if len(tokens) == 2:
        evidence += (f"; visual tokens {tokens['preserving']:.1f} vs {tokens['compressing']:.1f}, training FLOPs per "
                     f"sample {flops['preserving'] / 1e6:.0f}M vs {flops['compressing'] / 1e6:.0f}M")
    return {"claim": "Compressing connectors train and answer faster.", "verdict": verdict,
            "evidence": evidence + f" (quiet timing phase, interleaved rounds; margin {100 * SPEED_MARGIN:.0f} %)"}


def claim_faster(rows: list[dict]) -> dict:
    out = {}
    for name, key, higher_is_faster in (("training samples/s", "train_samples_per_s", True),
                                        ("prefill latency (ms)", "prefill_ms", False)):
        p = mean_sd(_seed_means([r for r in rows if r["family"] == "preserving"], lambda r: r.get(key)))[0]
        c = mean_sd(_seed_means([r for r in rows if r["family"] == "compressing"], lambda r: r.get(key)))[0]
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
    claim = "Average pooling ≈ C-Abstractor > Q-Former (mean over the three granularities)."
    if _has_questions(rows):
        group = {name: [r for r in rows if r["connector"] == name] for name in ("avgpool", "cabstractor", "qformer")}
        if not all(group.values()):
            missing = ", ".join(n for n, g in group.items() if not g)
            return {"claim": claim, "verdict": "inconclusive", "evidence": f"no runs of {missing}"}
        pair = compare(group["avgpool"], group["cabstractor"], GRANULARITIES)
        over_q = {n: compare(group[n], group["qformer"], GRANULARITIES) for n in ("avgpool", "cabstractor")}
        if pair["equivalent"] and all(r["ci95"][0] > 0 for r in over_q.values()):
            verdict = "reproduced"
        elif any(r["ci95"][1] < 0 for r in over_q.values()) or (
                (pair["ci95"][0] > 0 or pair["ci95"][1] < 0) and abs(pair["difference"]) >= EQUIVALENCE_MARGIN):
            verdict = "not reproduced"
        else:
            verdict = "inconclusive"
        evidence = "; ".join([describe(pair, "avgpool - cabstractor") + f", {'within' if pair['equivalent'] else 'not within'}"
                              f" the ±{EQUIVALENCE_MARGIN:.0f}-point margin"]
                             + [describe(r, f"{n} - qformer") for n, r in over_q.items()])
        return {"claim": claim, "verdict": verdict, "statistics": {"avgpool-cabstractor": pair, **{
            f"{n}-qformer": r for n, r in over_q.items()}}, "evidence": evidence}
    key = lambda r: statistics.fmean(r["scores"][g] for g in GRANULARITIES)  # noqa: E731
    stats = {name: mean_sd(_seed_means([r for r in rows if r["connector"].startswith(name)], key))
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
    claim = "Returns diminish with resolution."
    resolutions = sorted({r["resolution"] for r in rows})
    if len(resolutions) < 3:
        return {"claim": claim, "verdict": "inconclusive",
                "evidence": f"needs 3 resolutions, the study has {len(resolutions)}"}
    low, mid, high = ([r for r in rows if r["resolution"] == res] for res in resolutions[:3])
    sizes = ", ".join(map(str, resolutions[:3]))
    key = lambda r: statistics.fmean(r["scores"][g] for g in GRANULARITIES)  # noqa: E731
    means = [mean_sd(_seed_means(group, key))[0] for group in (low, mid, high)]
    scores = f"mean score at {sizes} px: {', '.join(f'{m:.1f}' for m in means)} %"
    if _has_questions(rows):
        # the same question index at each size asks the same kind of question about a picture drawn at that size
        first, second = compare(mid, low, GRANULARITIES), compare(high, mid, GRANULARITIES)
        shrink = contrast([(2.0, mid), (-1.0, low), (-1.0, high)], GRANULARITIES)
        if not all(r.get("n_questions") for r in (first, second, shrink)):
            verdict = "inconclusive"
        elif first["ci95"][0] > 0 and shrink["ci95"][0] > 0:
            verdict = "reproduced"  # the first step gains, and the second gains less
        elif first["ci95"][1] < 0 or shrink["ci95"][1] < 0 or (first["equivalent"] and second["equivalent"]):
            verdict = "not reproduced"  # resolution costs, the gains grow, or there are none to diminish
        else:
            verdict = "inconclusive"
        names = resolutions[:3]
        return {"claim": claim, "verdict": verdict,
                "statistics": {"first_gain": first, "second_gain": second, "gain_shrinks_by": shrink},
                "evidence": "; ".join([scores, describe(first, f"{names[1]} - {names[0]} px"),
                                       describe(second, f"{names[2]} - {names[1]} px"),
                                       describe(shrink, "first gain - second gain")])}
    first, second = means[1] - means[0], means[2] - means[1]
    margin = margin_for(rows, key)
    if first > margin and first - second > margin:
        verdict = "reproduced"
    elif second - first > margin or first < -margin:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return {"claim": claim, "verdict": verdict,
            "evidence": f"{scores} (gains {first:+.1f} then {second:+.1f}, {_margin(margin)})"}


CLAIMS = (claim_fine_grained, claim_comparable, claim_faster, claim_ranking, claim_resolution)
BLIND_MARGIN = 5.0  # percentage points: a blind model (grey pictures) further from chance means text gives answers away
LEARNT_MARGIN = 30.0  # percentage points above chance that the best connector must reach for "learnt"
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


def verdicts(rows: list[dict], chance: dict | None = None, timing: list[dict] | None = None) -> list[dict]:
    """Each claim's verdict. With `chance` (per granularity), a claim that rests on a granularity no
    connector learnt is inconclusive whatever the differences: they would be noise around chance. With
    `timing` (the quiet timing phase), the speed claim comes from it, not from the training runs."""
    state = learnt(rows, chance) if chance else {}
    out = []
    for claim in CLAIMS:
        result = claim_faster_timed(timing) if claim is claim_faster and timing else claim(rows)
        unlearnt = [g for g in USES.get(claim, ()) if g in state and not state[g]["learnt"]]
        if unlearnt:
            result = {**result, "verdict": "inconclusive"}
            result["evidence"] = (f"no connector learnt {' or '.join(unlearnt)} (best "
                                  + ", ".join(f"{state[g]['best']:.1f} vs chance {state[g]['chance']:.1f}" for g in unlearnt)
                                  + f", {LEARNT_MARGIN:.0f} points above chance needed); " + result["evidence"])
        out.append(result)
    return out


# ---- the report: tables, verdicts and plots of a study -------------------------------------------------
def _learnability(state: dict) -> str:
    """Whether the benchmark was learnt at all: the best connector per granularity against chance."""
    parts = [f"{g}: best {x['connector']} at {x['resolution']} px {x['best']:.1f} vs chance {x['chance']:.1f} "
             f"({'learnt' if x['learnt'] else 'not learnt'})" for g, x in state.items()]
    return (f"Learnt at all? (the best mean over seeds at least {LEARNT_MARGIN:.0f} points above chance) "
            + "; ".join(parts) + ". A claim that rests on a granularity no connector learnt is inconclusive.")


def _subtask_table(rows: list[dict]) -> list[str]:
    """The synthetic benchmark per subtask: what it needs from the picture and each family's mean score
    per resolution (over its connectors and seeds)."""
    from cvlm.eval.synthetic import NEEDS, SUBTASKS

    resolutions = sorted({r["resolution"] for r in rows})
    families = [f for f in ("preserving", "compressing") if any(r["family"] == f for r in rows)]
    header = [f"{f} {res} px" for f in families for res in resolutions]
    lines = ["Per subtask (% right, mean over each family's connectors and seeds):", "",
             "| subtask | granularity | needs from the picture | " + " | ".join(header) + " |",
             "|---|---|---|" + "---|" * len(header)]
    for subtask, granularity in SUBTASKS.items():
        cells = []
        for family in families:
            for res in resolutions:
                values = [v for r in rows if r["family"] == family and r["resolution"] == res
                          for scores in r.get("subtasks", {}).values() for k, v in scores.items()
                          if k.split("/", 1)[-1] == subtask]
                cells.append(f"{statistics.fmean(values):.1f}" if values else "-")
        lines.append(f"| {subtask} | {granularity} | {NEEDS[subtask]} | " + " | ".join(cells) + " |")
    return lines


def _setup(config: dict) -> list[str]:
    """What every run was built and trained with, including what makes a from-scratch preset LM learn:
    it applies to every connector alike."""
    if not config:
        return []
    from cvlm.presets import LM_PRESETS, VISION_PRESETS

    vision, llm = config["vision"], config["llm"]
    if vision in VISION_PRESETS:
        steps = config.get("pretrain_encoder_steps")
        trained = f"pre-trained {steps} steps on synthetic pictures" if steps else "random"
        vision += f" (width {config['vision_width']}, {trained}, then frozen)"
    if llm in LM_PRESETS:
        llm += (f" (from scratch: width {config['llm_width']}, {config['llm_layers']} layers, weights initialised at "
                "standard deviation 1/sqrt(width), a tokenizer in which each of the benchmark's answers is one token)")
    tuned = "the whole LM" if config.get("lm_full") else f"LoRA r={config['lora_r']} alpha={config['lora_alpha']}"
    return [f"Setup, the same for every connector: {vision} -> connector -> {llm}; align {config['align_steps']} steps "
            f"at {config['align_lr']:g} (connector only), finetune {config['finetune_steps']} steps at "
            f"{config['finetune_lr']:g} (connector + {tuned}), batch {config['batch_size']}.", ""]


def write_report(root: Path, result: dict) -> None:
    from cvlm.plot import study_plots

    rows = result["runs"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["connector"], r["resolution"]), []).append(r)
    lines = ["# cvlm study: to preserve or to compress?", "",
             f"{len(rows)} runs ({len(result['failures'])} failed"
             f"{', %d not finished' % len(result['pending']) if result.get('pending') else ''}); scores in % (mean ± std over seeds); the "
             "training-run timings (train s, samples/s, prefill ms) were taken while runs shared the cores and are "
             "information only.", "", *_setup(result.get("config") or {}),
             "| connector | family | resolution | Q | coarse | fine | reasoning | train s | samples/s | prefill ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (connector, resolution), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        r0 = runs[0]
        lines.append(f"| {connector} | {r0['family']} | {resolution} | {r0['tokens']} | "
                     + " | ".join(_fmt(*mean_sd([r["scores"][g] for r in runs])) for g in GRANULARITIES)
                     + f" | {statistics.fmean(r['train_wall_s'] for r in runs):.1f} | "
                     f"{statistics.fmean(r['train_samples_per_s'] for r in runs):.1f} | "
                     f"{statistics.fmean(r['prefill_ms'] for r in runs):.1f} |")
    if result.get("baselines"):
        chance, blind = result["baselines"]["chance"], result["baselines"]["blind"]
        lines.append("| chance (one over the options) | - | - | - | " + " | ".join(f"{chance[g]:.1f}" for g in GRANULARITIES)
                     + " | - | - | - |")
        if blind:
            lines.append(f"| blind: {blind['run']} over grey pictures | - | - | - | "
                         + " | ".join(f"{blind['scores'][g]:.1f}" for g in GRANULARITIES) + " | - | - | - |")
        lines += ["", _learnability(result["baselines"]["learnt"])]
        if blind:
            off = {g: blind["scores"][g] - chance[g] for g in GRANULARITIES}
            worst = max(off, key=lambda g: abs(off[g]))
            lines[-1] += (f" Blind baseline within chance ± {BLIND_MARGIN:.0f}: "
                          + ("yes" if abs(off[worst]) <= BLIND_MARGIN else f"no ({worst} {off[worst]:+.1f}: the "
                             "questions can be answered without the picture)")
                          + f" (largest gap: {worst} {off[worst]:+.1f} points).")
        lines += ["", *_subtask_table(rows)]
    if result.get("timing"):
        lines += ["", "Speed, measured apart from training (interleaved rounds in one process, nothing else running; "
                  "median ms; FLOPs counted by torch):", "",
                  "| connector | family | resolution | Q | training step ms | prefill ms | training MFLOPs / sample |"
                  " prefill MFLOPs |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t['label']} | {t['family']} | {t['resolution']} | {t['tokens']} | {t['train_step_ms']:.1f} | "
                  f"{t['prefill_ms']:.1f} | {t['train_flops_per_sample'] / 1e6:.1f} | {t['prefill_flops'] / 1e6:.1f} |"
                  for t in result["timing"]]
    lines += ["", "## Verdicts on the paper's claims", ""]
    for v in result["verdicts"]:
        lines.append(f"- **{v['verdict']}** — {v['claim']} {v['evidence']}.")
    if result["failures"]:
        lines += ["", "## Failed runs", ""] + [f"- {f['run']}: {f['error']}" for f in result["failures"]]
    if result.get("pending"):
        lines += ["", "## Runs not finished yet", "", "Run each (`cvlm study --output FOLDER --run NAME`), then "
                  "`cvlm study --output FOLDER --collect` again:", ""] + [f"- {name}" for name in result["pending"]]
    lines += ["", "Plots: `radar.png` (the granularities per connector, one panel per resolution), "
              "`accuracy_vs_tokens.png` and `accuracy_vs_training_time.png` (per granularity, mean ± sd over seeds), "
              "`loss_curves.png` (log axis, mean over seeds with their range)."]
    write_atomic(root / "report.md", "\n".join(lines) + "\n")
    if rows:
        study_plots(root, rows)

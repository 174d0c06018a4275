"""Plots drawn with matplotlib (headless, Agg), written atomically as PNG.

- `line_plot`: a training run's loss curve (`cvlm train`), or several named series.
- `study_plots`: the study's figures. Every connector of the registry has its own colour and
  marker (a variant such as `avgpool-output_grid-1` its own too), the family is the line style
  (preserving solid, compressing dashed), points are means over seeds with the spread over seeds as
  error bars; lines join resolutions of one connector, never seeds.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

from cvlm.eval import GRANULARITIES  # noqa: E402
from cvlm.files import atomic_path  # noqa: E402
from cvlm.paired import mean_sd  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "8", "d", "H", "1"]
FAMILY_STYLE = {"preserving": "-", "compressing": "--"}


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(figure)
    return path


def line_plot(xs, ys, path: str | os.PathLike, title: str = "", x_label: str = "", y_label: str = "",
              series: dict[str, tuple[list, list]] | None = None, size=(720, 440), log_y: bool = False) -> Path:
    """One line (xs, ys) or several (`series`: name -> (xs, ys)); `log_y` for losses that fall by decades
    (values that are not positive are left out)."""
    series = series or {y_label or "value": (list(xs), list(ys))}
    figure, axis = plt.subplots(figsize=(size[0] / 100, size[1] / 100))
    for name, (sx, sy) in series.items():
        points = [(x, y) for x, y in zip(sx, sy) if y is not None and (not log_y or y > 0)]
        axis.plot([x for x, _ in points], [y for _, y in points], label=name, linewidth=1.4)
    if log_y:
        axis.set_yscale("log")
    axis.set(title=title, xlabel=x_label, ylabel=y_label)
    axis.grid(alpha=0.3)
    if len(series) > 1:
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


# ---- the study ---------------------------------------------------------------------------------------
def connector_styles(labels) -> dict[str, dict]:
    """label -> matplotlib style: registry connectors in registry order first, then variants, each with
    its own colour and marker."""
    from cvlm.modeling import CONNECTORS

    ordered = list(CONNECTORS) + sorted(set(labels) - set(CONNECTORS))
    colours = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors, *plt.get_cmap("Set1").colors]
    return {label: {"color": colours[i % len(colours)], "marker": MARKERS[i % len(MARKERS)]}
            for i, label in enumerate(ordered)}


def _group(rows: list[dict], key) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for r in rows:
        value = key(r)
        if value is not None:
            groups.setdefault((r["connector"], r["resolution"]), []).append(value)
    return groups


def _legend(figure, axes, styles, rows) -> None:
    families = {r["connector"]: r["family"] for r in rows}
    handles = [plt.Line2D([], [], linestyle=FAMILY_STYLE[families[c]], label=f"{c} ({families[c]})", **styles[c])
               for c in sorted(families, key=list(styles).index)]
    columns = max(1, min(len(handles), int(figure.get_figwidth() / 2.6)))
    figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)


def radar(rows: list[dict], path: str | os.PathLike) -> Path:
    """The paper's Figure 1: the three granularities per connector, one panel per resolution."""
    import math

    resolutions = sorted({r["resolution"] for r in rows})
    styles = connector_styles({r["connector"] for r in rows})
    figure, axes = plt.subplots(1, len(resolutions), figsize=(4.6 * len(resolutions), 5.2),
                                subplot_kw={"projection": "polar"}, squeeze=False)
    angles = [2 * math.pi * i / len(GRANULARITIES) for i in range(len(GRANULARITIES))]
    for axis, resolution in zip(axes[0], resolutions):
        at = [r for r in rows if r["resolution"] == resolution]
        for connector in sorted({r["connector"] for r in at}, key=list(styles).index):
            runs = [r for r in at if r["connector"] == connector]
            means = [statistics.fmean(r["scores"][g] or 0 for r in runs) for g in GRANULARITIES]
            axis.plot(angles + angles[:1], means + means[:1], linestyle=FAMILY_STYLE[runs[0]["family"]],
                      linewidth=1.3, markersize=5, **styles[connector])
        axis.set_xticks(angles, GRANULARITIES)
        axis.set_ylim(0, 100)
        axis.set_title(f"{resolution} px", pad=14)
    _legend(figure, axes, styles, rows)
    figure.suptitle("granularity scores (%), mean over seeds")
    figure.tight_layout(rect=(0, 0.12, 1, 0.95))
    return _save(figure, path)


def score_versus(rows: list[dict], key: str, x_label: str, path: str | os.PathLike, log_x: bool = False) -> Path:
    """Score per granularity (one panel each) against `key` (visual tokens, training time): mean ± sd
    over seeds on both axes; a connector's resolutions joined in order."""
    styles = connector_styles({r["connector"] for r in rows})
    figure, axes = plt.subplots(1, len(GRANULARITIES), figsize=(15, 4.8), squeeze=False)
    for axis, granularity in zip(axes[0], GRANULARITIES):
        for connector in sorted({r["connector"] for r in rows}, key=list(styles).index):
            runs = [r for r in rows if r["connector"] == connector]
            xs = _group(runs, lambda r: r[key])
            ys = _group(runs, lambda r: r["scores"][granularity])
            points = sorted((resolution, mean_sd(xs[(c, resolution)]), mean_sd(ys[(c, resolution)]))
                            for (c, resolution) in ys if (c, resolution) in xs)
            if not points:
                continue
            axis.errorbar([x for _, (x, _), _ in points], [y for _, _, (y, _) in points],
                          xerr=[sx for _, (_, sx), _ in points], yerr=[sy for _, _, (_, sy) in points],
                          linestyle=FAMILY_STYLE[runs[0]["family"]], capsize=3, linewidth=1.2, markersize=6,
                          **styles[connector])
        if log_x:
            axis.set_xscale("log", base=2)
        axis.set(title=granularity, xlabel=x_label, ylabel="score (%)", ylim=(0, 102))
        axis.grid(alpha=0.3)
    _legend(figure, axes, styles, rows)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(figure, path)


def loss_curves(rows: list[dict], path: str | os.PathLike) -> Path:
    """Training loss (align, then finetune) per connector at the largest resolution, the mean over seeds
    with the seeds' range shaded, on a log axis so that late drops (the phase change) stay visible."""
    largest = max(r["resolution"] for r in rows)
    styles = connector_styles({r["connector"] for r in rows})
    figure, axis = plt.subplots(figsize=(9, 5.4))
    for connector in sorted({r["connector"] for r in rows}, key=list(styles).index):
        runs = [r for r in rows if r["connector"] == connector and r["resolution"] == largest]
        curves = []
        for r in runs:
            offset, curve = 0, {}
            for stage in ("align", "finetune"):
                for step, loss in r["losses"].get(stage, []):
                    curve[offset + step] = loss
                offset = max(curve, default=offset)
            curves.append(curve)
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        style = styles[connector]
        axis.plot(steps, [statistics.fmean(v) for v in values], linestyle=FAMILY_STYLE[runs[0]["family"]],
                  linewidth=1.3, markevery=max(1, len(steps) // 8), markersize=5, **style)
        axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=style["color"], alpha=0.15)
    axis.set_yscale("log")
    axis.set(title=f"training loss at {largest} px (mean over seeds, their range shaded)", xlabel="step (align, then finetune)",
             ylabel="loss")
    axis.grid(alpha=0.3)
    _legend(figure, [[axis]], styles, [r for r in rows if r["resolution"] == largest])
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(figure, path)


def study_plots(root: str | os.PathLike, rows: list[dict]) -> list[Path]:
    root = Path(root)
    return [radar(rows, root / "radar.png"),
            score_versus(rows, "tokens", "visual tokens Q", root / "accuracy_vs_tokens.png", log_x=True),
            score_versus(rows, "train_wall_s", "training wall time (s)", root / "accuracy_vs_training_time.png"),
            loss_curves(rows, root / "loss_curves.png")]

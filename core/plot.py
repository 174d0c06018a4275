"""Small PNG line plots drawn with Pillow (already a dependency), for loss curves and results."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def line_plot(xs, ys, path: str | os.PathLike, title: str = "", x_label: str = "", y_label: str = "",
              series: dict[str, tuple[list, list]] | None = None, size=(720, 440), log_y: bool = False) -> Path:
    """Writes a PNG with one line (xs, ys) or several (`series`: name -> (xs, ys)), atomically.
    `log_y`: a logarithmic y axis (positive values only), for losses that fall by decades."""
    series = series or {y_label or "value": (list(xs), list(ys))}
    if log_y:
        series = {name: (sx, [math.log10(y) if y is not None and y > 0 else None for y in sy])
                  for name, (sx, sy) in series.items()}
    all_x = [x for sx, _ in series.values() for x in sx]
    all_y = [y for _, sy in series.values() for y in sy if y is not None and math.isfinite(y)]
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, x1 = min(all_x), max(all_x) if max(all_x) > min(all_x) else min(all_x) + 1
    y_ticks = _ticks(min(all_y), max(all_y))
    y0, y1 = min(y_ticks[0], min(all_y)), max(y_ticks[-1], max(all_y))
    y1 = y1 if y1 > y0 else y0 + 1

    def point(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(80, 80, 80))
    for tick in y_ticks:
        _, py = point(x0, tick)
        draw.line([left - 4, py, width - right, py], fill=(225, 225, 225))
        draw.text((8, py - 6), f"{10 ** tick if log_y else tick:.3g}", fill="black", font=font)
    for tick in _ticks(x0, x1):
        px, _ = point(tick, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{tick:.4g}", fill="black", font=font)
    for i, (name, (sx, sy)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [point(x, y) for x, y in zip(sx, sy) if y is not None and math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points if len(points) < 40 else []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        if len(series) > 1:
            draw.text((left + 10, top + 8 + 14 * i), f"- {name}", fill=colour, font=font)
    draw.text((left, 12), title, fill="black", font=font)
    draw.text(((width - len(x_label) * 6) / 2, height - 20), x_label, fill="black", font=font)
    draw.text((8, top - 16), y_label + (" (log scale)" if log_y else ""), fill="black", font=font)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
    return path


def radar_plot(values: dict[str, list[float]], axes: list[str], path: str | os.PathLike, title: str = "",
               maximum: float = 100.0, size: int = 520) -> Path:
    """A radar chart (one polygon per name over `axes`, 0..maximum), as the connector paper's Figure 1."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    cx, cy, radius = size / 2, size / 2 + 10, size * 0.33
    angles = [-math.pi / 2 + 2 * math.pi * i / len(axes) for i in range(len(axes))]

    def point(angle, value):
        r = radius * max(0.0, min(value, maximum)) / maximum
        return cx + r * math.cos(angle), cy + r * math.sin(angle)

    for level in (0.25, 0.5, 0.75, 1.0):
        draw.polygon([point(a, level * maximum) for a in angles], outline=(210, 210, 210))
    for angle, name in zip(angles, axes):
        draw.line([(cx, cy), point(angle, maximum)], fill=(190, 190, 190))
        x, y = point(angle, maximum * 1.12)
        draw.text((x - 3 * len(name), y - 6), name, fill="black", font=font)
    for i, (name, vals) in enumerate(values.items()):
        colour = COLOURS[i % len(COLOURS)]
        draw.polygon([point(a, v) for a, v in zip(angles, vals)], outline=colour, width=2)
        draw.text((10, 30 + 14 * i), f"- {name}", fill=colour, font=font)
    draw.text((10, 10), title, fill="black", font=font)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
    return path

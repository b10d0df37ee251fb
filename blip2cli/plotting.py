"""PNG charts of training runs, drawn with Pillow (already a dependency): no plotting library needed.

Used by ``blip2 plot RUN_DIR...`` (several runs overlaid in one figure) and by ``blip2 demo``'s report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from blip2cli.errors import Blip2Error

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
Curves = dict[str, list[tuple[int, float]]]


def read_curves(run_dir: Path) -> Curves:
    """``RUN_DIR/metrics.jsonl`` -> {metric name: [(step, value)]} for every numeric top-level metric.

    Torn or foreign lines (an interrupted write) are skipped."""
    curves: Curves = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.setdefault(key, []).append((step, float(value)))
    return curves


def read_losses(run_dir: Path) -> Curves:
    """Only the loss curves (``loss``, ``loss_itc``, ... and validation ``val_loss*``)."""
    return {k: v for k, v in read_curves(run_dir).items() if k.startswith(("loss", "val_loss"))}


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def smooth(points: Sequence[tuple[float, float]], window: int = 10) -> list[tuple[float, float]]:
    """Trailing moving average (noisy per-step losses become readable)."""
    if len(points) <= window:
        return list(points)
    out = []
    for i in range(len(points)):
        chunk = points[max(0, i - window + 1): i + 1]
        out.append((points[i][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (multiples of 1, 2, 2.5 or 5 times a power of ten) within [lo, hi], as close to
    ``count`` of them as such steps allow."""
    span = hi - lo
    if span <= 0:
        return [lo]
    magnitude = 10 ** math.floor(math.log10(span / max(count - 1, 1)))

    def ticks(step: float) -> list[float]:
        first = math.ceil(lo / step - 1e-9)
        return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]

    steps = [m * magnitude for m in (1, 2, 2.5, 5, 10, 20)]
    return ticks(min(steps, key=lambda step: (abs(len(ticks(step)) - count), -step)))


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten within [lo, hi] (with 2x and 5x between them when there are fewer than three)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [10.0 ** d for d in decades if lo <= 10.0 ** d <= hi]
    if len(ticks) < 3:
        ticks = sorted(m * 10.0 ** d for d in decades for m in (1, 2, 5) if lo <= m * 10.0 ** d <= hi)
    return ticks or [lo, hi]


def tick_label(value: float) -> str:
    """Short, exact-looking labels: 0, 2.5, 1500, 12k, 1e-04."""
    if value == 0:
        return "0"
    size = abs(value)
    if size >= 10_000:
        return f"{value / 1000:.3g}k"
    if size < 1e-3:
        return f"{value:.0e}"
    return f"{value:.4g}"


def line_chart(title: str, series: dict[str, Sequence[tuple[float, float]]], size=(420, 300),
               log_y: bool = False, x_label: str = "step") -> Image.Image:
    """A line chart (x: step, y: value) with round-valued ticks and a legend. ``log_y``: a logarithmic value
    axis (for learning rates; values <= 0, such as the first warm-up step, are left out)."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    title_font, small = font(14), font(11)
    d.text((10, 6), title + (" (log scale)" if log_y else ""), fill="black", font=title_font)
    left, right, top, bottom = 58, w - 14, 30, h - 34
    # The legend goes between the title and the axes, in rows, so that it hides no curve.
    legend_places, x, y = [], left, top - 4
    for name in series:
        width = d.textlength(name, font=small) + 34
        if x + width > right and x > left:
            x, y = left, y + 16
        legend_places.append((x, y))
        x += width
    top = y + 22
    if log_y:
        series = {name: [(x, y) for x, y in s if y > 0] for name, s in series.items()}
    pts = [p for s in series.values() for p in s]
    if not pts:
        d.text((left, h // 2), "no data", fill="gray", font=title_font)
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if log_y:
        y0, y1 = (y0 / 2, y1 * 2) if y1 / y0 < 1.5 else (y0, y1)
        scale = (lambda y: math.log10(y))
        y_ticks = log_ticks(y0, y1)
    else:
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad
        scale = (lambda y: y)
        y_ticks = [t for t in nice_ticks(y0, y1) if y0 <= t <= y1]

    def xy(x: float, y: float) -> tuple[float, float]:
        fraction = (scale(y) - scale(y0)) / (scale(y1) - scale(y0))
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - fraction * (bottom - top)

    d.rectangle([left, top, right, bottom], outline="black")
    for yv in y_ticks:
        _, yp = xy(x0, yv)
        d.line([left + 1, yp, right - 1, yp], fill=(232, 232, 232))
        d.line([left - 4, yp, left, yp], fill="black")
        label = tick_label(yv)
        d.text((left - 6 - d.textlength(label, font=small), yp - 6), label, fill="black", font=small)
    for xv in nice_ticks(x0, x1):
        if x0 <= xv <= x1 and float(xv).is_integer():
            xp, _ = xy(xv, y1 if log_y else y0)
            d.line([xp, bottom, xp, bottom + 4], fill="black")
            label = tick_label(xv)
            d.text((xp - d.textlength(label, font=small) / 2, bottom + 6), label, fill="black", font=small)
    d.text((right - d.textlength(x_label, font=small), bottom + 19), x_label, fill="black", font=small)
    for i, s in enumerate(series.values()):
        color = PALETTE[i % len(PALETTE)]
        if len(s) > 1:
            d.line([xy(x, y) for x, y in s], fill=color, width=2)
        elif s:
            x, y = xy(*s[0])
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    for (x, y), (i, name) in zip(legend_places, enumerate(series)):
        d.line([x, y + 7, x + 18, y + 7], fill=PALETTE[i % len(PALETTE)], width=3)
        d.text((x + 22, y), name, fill="black", font=small)
    return img


def side_by_side(charts: Sequence[Image.Image]) -> Image.Image:
    return grid(charts, columns=len(charts))


def grid(charts: Sequence[Image.Image], columns: int = 2) -> Image.Image:
    """Charts in rows of ``columns``, each in a cell of the largest chart's size."""
    cw, ch = max(c.width for c in charts), max(c.height for c in charts)
    rows = math.ceil(len(charts) / columns)
    canvas = Image.new("RGB", (cw * min(columns, len(charts)), ch * rows), "white")
    for i, chart in enumerate(charts):
        canvas.paste(chart, ((i % columns) * cw, (i // columns) * ch))
    return canvas


def _loss_order(name: str) -> tuple[int, str]:
    return (0 if name in ("loss", "val_loss") else 1, name)


def plot_runs(run_dirs: Sequence[Path], out: Path, window: int = 10) -> Path:
    """One PNG of the runs' curves, overlaid: a panel per training loss (smoothed over ``window`` logged
    steps), per validation loss, and the learning rate on a log scale; one colour per run."""
    runs = {}
    for run_dir in map(Path, run_dirs):
        curves = read_curves(run_dir)
        if not curves:
            raise Blip2Error(f"{run_dir} has no metrics.jsonl with records to plot")
        name = run_dir.name if run_dir.name not in runs else str(run_dir)
        runs[name] = curves
    keys = sorted({k for c in runs.values() for k in c if k.startswith(("loss", "val_loss"))}, key=_loss_order)
    train = [k for k in keys if k.startswith("loss")]
    panels = []
    for key in keys:
        title = ("training " if key in train else "") + key + (f" (smoothed over {window})" if key in train else "")
        panels.append(line_chart(title, {name: smooth(c[key], window) if key in train else c[key]
                                         for name, c in runs.items() if key in c}, size=(560, 360)))
    panels.append(line_chart("learning rate", {name: c.get("lr", []) for name, c in runs.items()}, size=(560, 360),
                             log_y=True))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(panels, columns=2 if len(panels) > 1 else 1).save(out)
    return out


def plot_path(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """Where ``blip2 plot`` writes: ``out`` itself when it names a .png, ``out/curves.png`` for a folder;
    by default ``RUN/curves.png`` for one run, ``curves.png`` in the runs' common folder for several."""
    if out is not None:
        return Path(out) if str(out).lower().endswith(".png") else Path(out) / "curves.png"
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "curves.png"
    common = Path(os.path.commonpath([str(Path(r).resolve()) for r in run_dirs]))
    return (common if common != Path(common.anchor) else Path.cwd()) / "curves.png"

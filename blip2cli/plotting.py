"""PNG charts of training runs, drawn with Pillow (already a dependency): no plotting library needed.

Used by ``blip2 plot RUN_DIR`` and by ``blip2 demo``'s report.
"""

from __future__ import annotations

import json
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


def line_chart(title: str, series: dict[str, Sequence[tuple[float, float]]], size=(420, 300)) -> Image.Image:
    """A small line chart (x: step, y: value) with axes, ticks and a legend."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    title_font, small = font(13), font(10)
    d.text((10, 6), title, fill="black", font=title_font)
    left, right, top, bottom = 48, w - 12, 28, h - 28
    pts = [p for s in series.values() for p in s]
    if not pts:
        d.text((left, h // 2), "no data", fill="gray", font=title_font)
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-9:
        y1 = y0 + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    d.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, yp = xy(x0, yv)
        d.line([left - 3, yp, left, yp], fill="black")
        d.text((4, yp - 6), f"{yv:.3g}", fill="black", font=small)
        xv = x0 + (x1 - x0) * k / 4
        xp, _ = xy(xv, y0)
        d.line([xp, bottom, xp, bottom + 3], fill="black")
        d.text((xp - 10, bottom + 5), f"{xv:.0f}", fill="black", font=small)
    d.text((right - 30, bottom + 15), "step", fill="black", font=small)
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        if len(s) > 1:
            d.line([xy(x, y) for x, y in s], fill=color, width=2)
        d.line([right - 120, top + 10 + 14 * i, right - 100, top + 10 + 14 * i], fill=color, width=2)
        d.text((right - 96, top + 4 + 14 * i), name, fill="black", font=small)
    return img


def side_by_side(charts: Sequence[Image.Image]) -> Image.Image:
    width = sum(c.width for c in charts)
    canvas = Image.new("RGB", (width, max(c.height for c in charts)), "white")
    x = 0
    for chart in charts:
        canvas.paste(chart, (x, 0))
        x += chart.width
    return canvas


def plot_run(run_dir: Path, out: Path | None = None, window: int = 10) -> list[Path]:
    """``losses.png`` (every loss, smoothed, with validation losses) and ``lr.png`` for one run.

    Written into ``out`` (default: the run directory); returns the files written."""
    run_dir = Path(run_dir)
    curves = read_curves(run_dir)
    if not curves:
        raise Blip2Error(f"{run_dir} has no metrics.jsonl with records to plot")
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    train_losses = {k: smooth(v, window) for k, v in curves.items() if k.startswith("loss")}
    val_losses = {k: v for k, v in curves.items() if k.startswith("val_loss")}
    charts = [line_chart(f"{run_dir.name}: training losses", train_losses, size=(520, 340))]
    if val_losses:
        charts.append(line_chart("validation losses", val_losses, size=(520, 340)))
    written = [out / "losses.png", out / "lr.png"]
    side_by_side(charts).save(written[0])
    line_chart("learning rate", {"lr": curves.get("lr", [])}, size=(520, 340)).save(written[1])
    return written

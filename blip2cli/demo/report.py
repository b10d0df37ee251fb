"""What ``blip2 demo`` shows: a rich table (metric vs baseline, wall time per stage), loss-curve PNGs and a
gallery PNG of held-out pictures with their generated captions and answers.

Plots are drawn with Pillow (already a dependency) so the demo needs no plotting library.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from blip2cli.plotting import font, line_chart, read_losses, side_by_side, smooth


# ----------------------------------------------------------------- table
def targets(result) -> list[dict[str, Any]]:
    """One row per headline metric: value, baseline, and the target the full-size demo is meant to reach."""
    m, b = result.metrics, result.baselines
    rows: list[dict[str, Any]] = []
    chance = b.get("retrieval_chance_r1", 0.0)
    s1 = m.get("stage1", {})
    for key, label in (("txt_r1", "R@1 image→text"), ("img_r1", "R@1 text→image")):
        if key in s1:
            rows.append({"metric": label, "run": "stage 1", "value": s1[key], "baseline": chance,
                         "baseline_name": "chance", "target": 10 * chance, "target_text": "≥ 10× chance"})
    itc = m.get("stage1_itc", {})
    if itc and itc is not s1:
        for key, label in (("txt_r1", "R@1 image→text"), ("img_r1", "R@1 text→image")):
            if key in itc:
                rows.append({"metric": label, "run": "stage 1 (ITC only)", "value": itc[key],
                             "baseline": chance, "baseline_name": "chance", "target": None,
                             "target_text": "(no ITM re-rank)"})
    majority = b.get("vqa_majority", 0.0)
    for run, label in (("stage2", "stages 1+2"), ("stage2_no_stage1", "stage 2 only")):
        r = m.get(run, {})
        if "CIDEr" in r:
            cb = b.get("caption_constant_cider", 0.0)
            rows.append({"metric": "CIDEr", "run": label, "value": r["CIDEr"], "baseline": cb,
                         "baseline_name": "constant", "target": None if run != "stage2" else 2 * cb,
                         "target_text": "≥ 2× baseline" if run == "stage2" else ""})
        if "accuracy" in r:
            goal = majority + 2 / 3 * (100 - majority)
            rows.append({"metric": "VQA accuracy", "run": label, "value": r["accuracy"], "baseline": majority,
                         "baseline_name": "majority",
                         "target": goal if run == "stage2" else None,
                         "target_text": f"≥ {goal:.1f} (⅔ of gap)" if run == "stage2" else ""})
    return rows


def target_cell(row: dict[str, Any], counts: bool) -> str:
    """The target column: the target with ✓ / ✗ where the run is sized to reach it (``counts``), else the
    target for information, with whether it was reached, and no verdict."""
    if row["target"] is None:
        return row["target_text"]
    reached = row["value"] >= row["target"]
    if counts:
        return f"{row['target_text']} " + ("[green]✓[/green]" if reached else "[red]✗[/red]")
    return f"[dim]{row['target_text']} ({'reached' if reached else 'not reached'}; full size only)[/dim]"


def closing_lines(result) -> list[str]:
    """What the demo ends with: how long it took against the stated spread, where its checkpoints are and
    the exact ``blip2 ask`` commands that work on them."""
    import shlex

    from blip2cli.demo.runner import DEMO_SIZES

    size = DEMO_SIZES[result.size]
    runs = result.out / "runs"
    stage2 = runs / "stage2" / "final"
    minutes = sum(result.seconds.values()) / 60
    lines = [f"blip2 demo --size {size.world} took {minutes:.1f} minutes (runs of this size: {size.duration()})."]
    checkpoints = [f"stage 1 {runs / 'stage1' / 'final'}", f"stage 2 {stage2}"]
    if (runs / "stage2_no_stage1" / "final").exists():
        checkpoints.append(f"stage 2 without stage 1 {runs / 'stage2_no_stage1' / 'final'}")
    lines.append("checkpoints: " + "; ".join(checkpoints))
    lines.append(f"plots: {result.out / 'losses.png'}; gallery: {result.out / 'gallery.png'}; figures: "
                 f"{result.out / 'results.json'}; scorer: {result.scorer}")
    if result.ask:
        # The commands the ask stage ran, without prompt flags: the checkpoint remembers its prompts.
        image, model = shlex.quote(str(result.ask["image"])), shlex.quote(str(stage2))
        lines.append(f"try it: blip2 ask {image} --model {model}")
        lines.append(f"        blip2 ask {image} {shlex.quote('what color is the shape?')} --model {model}")
    return lines


def print_report(result, console: Console | None = None) -> None:
    from blip2cli.demo.runner import DEMO_SIZES

    console = console or Console()
    counts = DEMO_SIZES[result.size].targets
    table = Table(title="blip2 demo: held-out split (half of it unseen colour-shape pairs)")
    for col, kw in (("metric", {}), ("model", {}), ("value", {"justify": "right"}), ("baseline", {}),
                    ("target", {})):
        table.add_column(col, **kw)
    for row in targets(result):
        table.add_row(row["metric"], row["run"], f"{row['value']:.1f}", f"{row['baseline']:.1f} {row['baseline_name']}",
                      target_cell(row, counts))
    console.print(table)
    console.print(f"(per-question-type majority answers would score {type_majority_of(result):.1f} on VQA)",
                  highlight=False)
    fig5 = figure5_effect(result)
    if fig5:
        console.print(fig5)
    times = Table(title="wall time per stage")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for stage, seconds in result.seconds.items():
        times.add_row(stage, f"{seconds:.0f}")
    times.add_row("[bold]total[/bold]", f"[bold]{sum(result.seconds.values()):.0f}[/bold]")
    console.print(times)
    if result.ask:
        a = result.ask
        console.print(f"[bold]blip2 ask[/bold] {a['image']} (truth: {a['truth']})\n"
                      f"  caption: {a['caption']}\n  {a['question']} → {a['answer']} (expected {a['expected_answer']})",
                      highlight=False)
    for line in closing_lines(result):
        console.print(line, highlight=False, soft_wrap=True)


def type_majority_of(result) -> float:
    return result.baselines.get("vqa_type_majority", result.baselines.get("vqa_majority", 0.0))


def figure5_effect(result) -> str:
    """One line comparing stage 2 with and without stage 1 (the paper's Figure 5)."""
    with_s1, without = result.metrics.get("stage2", {}), result.metrics.get("stage2_no_stage1", {})
    parts = []
    for key, label in (("CIDEr", "CIDEr"), ("accuracy", "VQA acc")):
        if key in with_s1 and key in without:
            parts.append(f"{label} {with_s1[key]:.1f} vs {without[key]:.1f}")
    loss_with = final_loss(result.out / "runs" / "stage2")
    loss_without = final_loss(result.out / "runs" / "stage2_no_stage1")
    if loss_with is not None and loss_without is not None:
        early_with = early_loss(result.out / "runs" / "stage2")
        early_without = early_loss(result.out / "runs" / "stage2_no_stage1")
        parts.append(f"mean LM loss over the first 40% of steps {early_with:.3f} vs {early_without:.3f}, "
                     f"final {loss_with:.3f} vs {loss_without:.3f}")
    return ("stage 2 with vs without stage 1 (Figure 5): " + ", ".join(parts)) if parts else ""


# ----------------------------------------------------------------- loss curves
def final_loss(run_dir: Path, last: int = 5) -> float | None:
    points = read_losses(run_dir).get("loss", [])
    if not points:
        return None
    tail = [v for _, v in points[-last:]]
    return sum(tail) / len(tail)


def early_loss(run_dir: Path, fraction: float = 0.4) -> float | None:
    """Mean training loss over the first ``fraction`` of the steps (how fast a run learns)."""
    points = read_losses(run_dir).get("loss", [])
    if not points:
        return None
    early = [v for step, v in points if step <= points[-1][0] * fraction]
    return sum(early) / len(early)


def write_plots(out: Path, result) -> None:
    """``losses.png`` (unimodal, stage 1, stage 2 with vs without stage 1) and ``gallery.png``."""
    charts = []
    uni_path = out / "parts" / "losses.json"
    if uni_path.is_file():
        uni = json.loads(uni_path.read_text())
        charts.append(line_chart("unimodal pretraining (one modality each)",
                                 {f"{k} ({'MIM' if k == 'vision' else 'MLM' if k == 'bert' else 'LM'})":
                                  smooth([(i + 1, v) for i, v in enumerate(vals)]) for k, vals in uni.items()}))
    s1 = read_losses(out / "runs" / "stage1")
    charts.append(line_chart("stage 1 losses", {k.removeprefix("loss_") or k: v for k, v in s1.items()}))
    s2 = read_losses(out / "runs" / "stage2").get("loss", [])
    s2n = read_losses(out / "runs" / "stage2_no_stage1").get("loss", [])
    charts.append(line_chart("stage 2 LM loss (Figure 5)", {"with stage 1": s2, "without stage 1": s2n}))
    side_by_side(charts).save(out / "losses.png")
    write_gallery(out / "gallery.png", result.samples)


# ----------------------------------------------------------------- gallery
def gallery_samples(world, predictions: dict[str, dict], n: int = 8) -> list[dict[str, Any]]:
    """Held-out pictures (unseen colour-shape pairs first) with generated caption and answers."""
    from blip2cli.demo.world import HELD_OUT_PAIRS, caption, questions

    captions = {int(k): v for k, v in predictions.get("captions", {}).items()}
    answers = {int(k): v for k, v in predictions.get("answers", {}).items()}
    order = sorted(range(len(world.test)), key=lambda i: (world.test[i].pair not in HELD_OUT_PAIRS, i))
    samples = []
    for i in order[:n]:
        scene, image_id = world.test[i], i + 1
        qa = questions(scene, random.Random(1000 + i))
        shown = []
        for k in (0, 1, 3):  # colour, shape, position
            qid = image_id * 100 + k
            shown.append({"question": qa[k][2], "answer": answers.get(qid, "?"), "truth": qa[k][3]})
        samples.append({"image": str(world.root / "images" / "test" / f"{image_id:012d}.jpg"),
                        "unseen_pair": scene.pair in HELD_OUT_PAIRS, "truth": caption(scene, 0),
                        "caption": captions.get(image_id, "?"), "qa": shown})
    return samples


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def write_gallery(path: Path, samples: Sequence[dict[str, Any]], cols: int = 4) -> None:
    if not samples:
        return
    cell_w, pic, text_h = 260, 128, 150
    rows = math.ceil(len(samples) / cols)
    canvas = Image.new("RGB", (cols * cell_w, rows * (pic + text_h)), "white")
    d = ImageDraw.Draw(canvas)
    text_font = font(11)
    for k, s in enumerate(samples):
        x, y = (k % cols) * cell_w, (k // cols) * (pic + text_h)
        with Image.open(s["image"]) as im:
            canvas.paste(im.convert("RGB").resize((pic, pic), Image.NEAREST), (x + (cell_w - pic) // 2, y + 4))
        ty = y + pic + 8
        tag = "UNSEEN colour+shape" if s["unseen_pair"] else "seen colour+shape"
        d.text((x + 6, ty), tag, fill=(200, 0, 0) if s["unseen_pair"] else (90, 90, 90), font=text_font)
        ty += 14
        for line in _wrap("model: " + s["caption"], 40)[:3]:
            d.text((x + 6, ty), line, fill="black", font=text_font)
            ty += 13
        for line in _wrap("truth: " + s["truth"], 40)[:3]:
            d.text((x + 6, ty), line, fill=(90, 90, 90), font=text_font)
            ty += 13
        for qa in s["qa"]:
            ok = qa["answer"].strip().lower() == qa["truth"]
            d.text((x + 6, ty), f"{qa['question']} {qa['answer']}", fill=(0, 130, 0) if ok else (200, 0, 0), font=text_font)
            ty += 13
    canvas.save(path)

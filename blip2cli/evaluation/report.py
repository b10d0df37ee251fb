"""``blip2 eval report RUN_DIR...``: one table of evaluation runs next to the paper's numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blip2cli.errors import Blip2Error
from blip2cli.evaluation.runner import METRICS_JSON
from blip2cli.evaluation.tasks import HEADLINE_METRICS, PAPER_MODELS, paper_model_key, paper_numbers, task_spec

WARNING_MARK = "⚠"  # marks a value whose run's outputs look degenerate (``output_stats`` warnings)
UNLEMMATIZED_MARK = "†"  # marks an OK-VQA accuracy computed without the lemmatiser the paper's protocol applies


def load_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``metrics.json`` of a run directory (or the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_JSON
    if not path.is_file():
        raise Blip2Error(f"no {METRICS_JSON} in {run_dir}; is it a `blip2 eval` output directory?")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise Blip2Error(f"cannot read {path}: {err}") from None
    if not isinstance(metrics, dict) or "task" not in metrics:
        raise Blip2Error(f"{path} is not a blip2 eval metrics file (no 'task')")
    return metrics


def output_warnings(metrics: dict[str, Any]) -> list[str]:
    """The output sanity notes of a run (mostly empty or identical outputs, a biased answer), if any."""
    stats = metrics.get("output_stats")
    warnings = stats.get("warnings") if isinstance(stats, dict) else None
    return [str(w) for w in warnings] if isinstance(warnings, list) else []


def protocol_label(metrics: dict[str, Any]) -> str:
    """Whose settings a run used: its ``protocol`` ("paper" / "lavis"; "—" before it was recorded), plus the
    GQA scoring ("gqa current" / "gqa release")."""
    settings = metrics.get("settings") if isinstance(metrics.get("settings"), dict) else {}
    label = str(metrics.get("protocol") or settings.get("protocol") or "—")
    scoring = metrics.get("gqa_scoring")
    return f"{label}, gqa {scoring}" if scoring else label


def unlemmatized(metrics: dict[str, Any]) -> bool:
    """An OK-VQA run whose answers were not lemmatised (spaCy missing, or ``--no-lemmatize``): the paper's
    protocol lemmatises them, so the figure is not comparable. Runs that did not record it count as such."""
    return task_spec(metrics["task"]).name == "okvqa" and metrics.get("lemmatized") is not True


def report_rows(run_dirs: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per (run, headline metric): run, task, split, model, paper row, metric, value, paper, delta,
    num_items, protocol (``protocol_label``), unlemmatized (``unlemmatized``), warnings (the run's output
    sanity notes)."""
    rows = []
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
        spec = task_spec(metrics["task"])
        model = metrics.get("model", "")
        paper = paper_numbers(spec.name, model)
        paper_row = PAPER_MODELS.get(paper_model_key(model) or "", "")
        for name in HEADLINE_METRICS[spec.kind]:
            if name not in metrics and name not in paper:
                continue
            value = metrics.get(name)
            reference = paper.get(name)
            delta = value - reference if isinstance(value, (int, float)) and reference is not None else None
            rows.append({"run": str(run_dir), "task": spec.name, "split": metrics.get("split", ""), "model": model,
                         "paper_model": paper_row, "metric": name, "value": value, "paper": reference, "delta": delta,
                         "num_items": metrics.get("num_items"), "protocol": protocol_label(metrics),
                         "unlemmatized": unlemmatized(metrics), "warnings": output_warnings(metrics)})
    return rows


def report_table(run_dirs: list[str | os.PathLike]):
    """A rich table of ``report_rows``."""
    from rich.table import Table

    table = Table(title="blip2 eval: runs vs the paper")
    columns = ("run", "task", "split", "items", "model (paper row)", "protocol", "metric", "value", "paper", "Δ")
    for column in columns:
        table.add_column(column, justify="right" if column in ("items", "value", "paper", "Δ") else "left")
    flagged = unlemmatized_seen = False
    for row in report_rows(run_dirs):
        model = Path(row["model"]).name if row["model"] else ""
        if row["paper_model"]:
            model += f" ({row['paper_model']})"
        value = "skipped" if row["value"] is None else _fmt(row["value"])
        if row["unlemmatized"]:
            value = f"{UNLEMMATIZED_MARK} {value}"
            unlemmatized_seen = True
        if row["warnings"]:
            value = f"{WARNING_MARK} {value}"
            flagged = True
        table.add_row(
            Path(row["run"]).name, row["task"], row["split"], _fmt(row["num_items"], 0), model, row["protocol"],
            row["metric"], value, _fmt(row["paper"]), _fmt(row["delta"], signed=True),
        )
    captions = []
    if flagged:
        captions.append(f"{WARNING_MARK}: suspicious outputs (many empty or identical ones, or one over-predicted answer); "
                        f"see the notes in the run's {METRICS_JSON}")
    if unlemmatized_seen:
        captions.append(f"{UNLEMMATIZED_MARK}: OK-VQA answers not lemmatised (spaCy or its model missing, or "
                        "--no-lemmatize): not comparable with the paper's figure")
    if captions:
        table.caption = "\n".join(captions)
    return table


def metrics_table(metrics: dict[str, Any]):
    """The terminal table of one run's metrics, with the paper's numbers where known."""
    from rich.table import Table

    spec = task_spec(metrics["task"])
    paper = paper_numbers(spec.name, metrics.get("model"))
    table = Table(title=f"{spec.name} {metrics.get('split', '')} ({metrics.get('num_items', '?')} items)")
    for column in ("metric", "value", "paper"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    names = list(HEADLINE_METRICS[spec.kind])
    if spec.kind == "caption":
        names = ["BLEU-1", "BLEU-2", "BLEU-3"] + names
    if spec.kind == "retrieval":
        names += ["txt_r_mean", "img_r_mean"]
    for name in names:
        if name in metrics:
            table.add_row(name, "skipped" if metrics[name] is None else _fmt(metrics[name]), _fmt(paper.get(name)))
    for answer_type, value in (metrics.get("per_type") or {}).items():
        table.add_row(f"  {answer_type}", _fmt(value), "")
    for domain, values in (metrics.get("per_domain") or {}).items():
        table.add_row(f"  {domain} CIDEr", _fmt(values.get("CIDEr")), "")
    return table


def _fmt(value: Any, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "—"
    if digits == 0:
        return str(value)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"

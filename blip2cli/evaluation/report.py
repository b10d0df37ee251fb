"""``blip2 eval report RUN_DIR...``: one table of evaluation runs next to the paper's numbers, and the table
``blip2 eval`` prints for one run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blip2cli.errors import Blip2Error
from blip2cli.evaluation.tasks import (
    HEADLINE_METRICS,
    METRICS_JSON,
    PAPER_MODELS,
    model_label,
    paper_model_key,
    paper_numbers,
    task_spec,
)

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


def collect_runs(paths: list[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The ``blip2 eval`` output directories among ``paths``, and the paths skipped with the reason for each.

    A path is a run when it holds a readable ``metrics.json``; a directory that is not one but has runs
    among its subdirectories (``runs/eval/``, or a mixed ``runs/``) stands for them, its other
    subdirectories being skipped.
    """
    runs: list[Path] = []
    skipped: list[tuple[Path, str]] = []

    def check(path: Path) -> str | None:
        if path.is_dir() and not (path / METRICS_JSON).is_file():
            return f"no {METRICS_JSON}: not a `blip2 eval` output directory"
        try:
            load_metrics(path)
        except Blip2Error as err:
            return str(err)
        return None

    for given in map(Path, paths):
        reason = check(given) if given.exists() else f"{given} does not exist"
        if reason is None:
            runs.append(given)
            continue
        children = sorted(p for p in given.iterdir() if p.is_dir()) if given.is_dir() else []
        found = {child: check(child) for child in children}
        if any(why is None for why in found.values()):
            runs += [child for child, why in found.items() if why is None]
            skipped += [(child, why) for child, why in found.items() if why is not None]
        else:
            skipped.append((given, reason))
    return runs, skipped


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


def not_applicable(metrics: dict[str, Any]) -> dict[str, str]:
    """Metrics of a run that do not mean what their name says, each with the reason: retrieval recall at K
    when ITM re-ranked fewer than K candidates (``--k-test``), and the means that include them."""
    if task_spec(metrics["task"]).kind != "retrieval":
        return {}
    settings = metrics.get("settings") if isinstance(metrics.get("settings"), dict) else {}
    k_test = settings.get("k_test")
    if not isinstance(k_test, int):
        return {}
    why = f"--k-test {k_test}: only {k_test} candidate(s) re-ranked"
    out = {f"{side}_r{k}": why for k in (5, 10) if k > k_test for side in ("txt", "img")}
    if out:
        out.update({name: why for name in ("txt_r_mean", "img_r_mean", "r_mean")})
    return out


def report_rows(run_dirs: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per (run, headline metric): run, task, split, model, model_label (``model_label``), paper row,
    metric, value, paper, delta, applies (False with ``--k-test`` below K, see ``not_applicable``),
    num_items, protocol (``protocol_label``), unlemmatized (``unlemmatized``), warnings (the run's output
    sanity notes)."""
    rows = []
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
        spec = task_spec(metrics["task"])
        model = metrics.get("model", "")
        paper = paper_numbers(spec.name, model)
        paper_row = PAPER_MODELS.get(paper_model_key(model) or "", "")
        skip = not_applicable(metrics)
        for name in HEADLINE_METRICS[spec.kind]:
            if name not in metrics and name not in paper:
                continue
            value = metrics.get(name)
            reference = paper.get(name)
            delta = value - reference if isinstance(value, (int, float)) and reference is not None else None
            rows.append({"run": str(run_dir), "task": spec.name, "split": metrics.get("split", ""), "model": model,
                         "model_label": model_label(model) if model else "", "paper_model": paper_row,
                         "metric": name, "value": value, "paper": reference, "delta": delta,
                         "applies": name not in skip, "num_items": metrics.get("num_items"),
                         "protocol": protocol_label(metrics), "unlemmatized": unlemmatized(metrics),
                         "warnings": output_warnings(metrics)})
    return rows


def report_table(run_dirs: list[str | os.PathLike]):
    """A rich table with one row per run (its metrics on lines of their own within the row)."""
    from rich.table import Table

    table = Table(title="blip2 eval: runs vs the paper", show_lines=True, caption_justify="left")
    columns = ("run", "task", "split", "items", "model (paper row)", "protocol", "metric", "value", "paper", "Δ")
    for column in columns:
        table.add_column(column, justify="right" if column in ("items", "value", "paper", "Δ") else "left")
    flagged = unlemmatized_seen = not_applicable_seen = False
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in report_rows(run_dirs):
        by_run.setdefault(row["run"], []).append(row)
    for run, rows in by_run.items():
        first = rows[0]
        model = first["model_label"] + (f" ({first['paper_model']})" if first["paper_model"] else "")
        cells: dict[str, list[str]] = {"metric": [], "value": [], "paper": [], "Δ": []}
        for row in rows:
            value = "skipped" if row["value"] is None else _fmt(row["value"])
            if not row["applies"]:
                value, not_applicable_seen = f"n/a ({value})", True
            if row["unlemmatized"]:
                value, unlemmatized_seen = f"{UNLEMMATIZED_MARK} {value}", True
            if row["warnings"]:
                value, flagged = f"{WARNING_MARK} {value}", True
            cells["metric"].append(row["metric"])
            cells["value"].append(value)
            cells["paper"].append(_fmt(row["paper"]))
            cells["Δ"].append(_fmt(row["delta"], signed=True) if row["applies"] else "—")
        table.add_row(Path(run).name, first["task"], first["split"], _fmt(first["num_items"], 0), model,
                      first["protocol"], *("\n".join(cells[c]) for c in ("metric", "value", "paper", "Δ")))
    captions = []
    if flagged:
        captions.append(f"{WARNING_MARK}: suspicious outputs (many empty or identical ones, or one over-predicted answer); "
                        f"see the notes in the run's {METRICS_JSON}")
    if unlemmatized_seen:
        captions.append(f"{UNLEMMATIZED_MARK}: OK-VQA answers not lemmatised (spaCy or its model missing, or "
                        "--no-lemmatize): not comparable with the paper's figure")
    if not_applicable_seen:
        captions.append("n/a: recall at K with fewer than K candidates re-ranked by ITM (--k-test): the ranks "
                        "beyond them are not scored, so the figure (in brackets) does not measure retrieval")
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
    skip = not_applicable(metrics)
    for name in names:
        if name in metrics:
            value = "skipped" if metrics[name] is None else _fmt(metrics[name])
            table.add_row(name, f"n/a ({value})" if name in skip else value, _fmt(paper.get(name)))
    if skip:
        table.caption = f"n/a: {next(iter(skip.values()))}, so recall beyond them does not measure retrieval"
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

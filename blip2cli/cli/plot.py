"""`blip2 plot RUN_DIR...`: PNG curves of a training run's losses and learning rate."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from blip2cli.cli import app

PLOT_EXAMPLES = """
Examples:

  blip2 plot blip2-data/runs/pretrain_stage1_vitg            # writes losses.png and lr.png into the run

  blip2 plot runs/a runs/b --out plots/ --smooth 50
"""


@app.command(epilog=PLOT_EXAMPLES)
def plot(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories (each with a metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, help="Folder for the PNGs [default: each run directory; with several runs, OUT/<run name>]."),
    smooth: int = typer.Option(10, min=1, help="Moving-average window over logged steps for training losses."),
) -> None:
    """Write PNG curves of the losses (training, smoothed, and validation) and the learning rate."""
    from blip2cli.plotting import plot_run

    for run_dir in run_dirs:
        target = out / run_dir.name if out is not None and len(run_dirs) > 1 else out
        for path in plot_run(run_dir, target, window=smooth):
            print(path)

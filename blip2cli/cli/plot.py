"""`blip2 plot RUN_DIR...`: one PNG of training runs' losses and learning rate, the runs overlaid."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from blip2cli.cli import app

PLOT_EXAMPLES = """
Examples:

  blip2 plot blip2-data/runs/pretrain_stage1_vitg            # -> blip2-data/runs/pretrain_stage1_vitg/curves.png

  blip2 plot runs/stage2 runs/stage2_no_stage1 --smooth 50   # two runs in one figure -> runs/curves.png

  blip2 plot runs/a runs/b --out plots/compare.png

One panel per loss (training losses smoothed, validation losses as logged) and one for the learning rate
(log scale); one colour per run.
"""


@app.command(epilog=PLOT_EXAMPLES)
def plot(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories (each with a metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, help="A .png file, or a folder for curves.png [default: RUN/curves.png for one run, curves.png in the runs' common folder for several]."),
    smooth: int = typer.Option(10, min=1, help="Moving-average window over logged steps for training losses."),
) -> None:
    """Plot training runs' losses and learning rate in one PNG, the runs overlaid."""
    from blip2cli.plotting import plot_path, plot_runs

    print(plot_runs(run_dirs, plot_path(run_dirs, out), window=smooth))

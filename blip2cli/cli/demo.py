"""`blip2 demo`: the whole BLIP-2 pipeline on a synthetic world, offline, on a CPU, with held-out metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blip2cli.cli import app
from blip2cli.cli._common import device_option, quiet_libraries, stderr
from blip2cli.demo.runner import DEMO_SIZES

DEMO_EXAMPLES = f"""
Examples:

  blip2 demo                                  # full size, into ./blip2-demo ({DEMO_SIZES["full"].duration()})

  blip2 demo --size small --out /tmp/demo     # a smaller world, fewer steps ({DEMO_SIZES["small"].duration()})

  blip2 demo --no-ablation                    # skip the stage-2-without-stage-1 comparison

  blip2 demo --stage1-steps 2000              # train stage 1 longer

The times are the spread of the runs measured (the same figures each time; the machines' load varied).
Only the full size is meant to reach the targets in its report; the small one shows them for information.
The demo ends with the paths of its checkpoints and the `blip2 ask` commands that work on them, e.g.
(with the default --out):

  blip2 ask blip2-demo/world/images/test/000000000001.jpg "what color is the shape?" --model blip2-demo/runs/stage2/final

The stage-2 checkpoint remembers the prompts it was trained with ("a photo of", "question {{}} answer"), so
no prompt flags are needed.
"""


@app.command(epilog=DEMO_EXAMPLES)
def demo(
    out: Path = typer.Option(Path("blip2-demo"), "--out", help="Folder for everything the demo writes."),
    size: str = typer.Option("full", "--size", metavar="<" + "|".join(DEMO_SIZES) + ">",
                             help="full: the README's figures, meant to reach the report's targets; small: faster, for smoke tests."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic world and the unimodal pretraining."),
    ablation: bool = typer.Option(True, "--ablation/--no-ablation", help="Also train stage 2 without stage 1 (the paper's Figure 5)."),
    stage1_steps: Optional[int] = typer.Option(None, "--stage1-steps", min=1, help="Stage-1 optimizer steps [default: by size]."),
    stage2_steps: Optional[int] = typer.Option(None, "--stage2-steps", min=1, help="Stage-2 optimizer steps [default: by size]."),
    device: str = device_option("cpu", help="auto, cpu, cuda or cuda:N, for every stage that computes (the demo is sized for a CPU)."),
) -> None:
    """Generate a synthetic image-text world, pre-train tiny unimodal parts, then run download -> stage 1 ->
    stage 2 -> eval -> ask with the real commands and report held-out metrics against their baselines."""
    from blip2cli.demo.report import print_report
    from blip2cli.demo.runner import DemoOptions, run_demo
    from blip2cli.errors import Blip2Error

    if size not in DEMO_SIZES:
        raise Blip2Error(f"unknown demo size {size!r}; use one of {', '.join(DEMO_SIZES)}")
    quiet_libraries()
    options = DemoOptions(out=out, size=size, seed=seed, ablation=ablation, stage1_steps=stage1_steps,
                          stage2_steps=stage2_steps, device=device)
    result = run_demo(options, console=stderr)
    print_report(result)

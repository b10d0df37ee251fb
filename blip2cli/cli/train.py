from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from blip2cli.cli import app
from blip2cli.cli._common import DEVICE, ROOT, quiet_libraries, stderr

PRETRAIN_EXAMPLES = """
Examples:

  blip2 pretrain --stage 1                                   # ViT-g, the workspace's shards, paper settings

  blip2 pretrain --stage 1 --vision clip-vit-l loss.itg=0    # ViT-L, the paper's ITC+ITM ablation

  blip2 pretrain --stage 2 --llm opt-2.7b                    # starts from the latest stage-1 run

  blip2 pretrain --recipe tiny_stage1 data.shards='["shards/{00000..00003}.tar"]'   # the recipe's stage

  blip2 pretrain --recipe ./my_stage2.toml                   # a copy from `blip2 recipes copy`

  blip2 pretrain --stage 1 --nproc-per-node 8                # relaunches itself under torchrun

  torchrun --nproc-per-node 8 -m blip2cli pretrain --stage 2 --llm flant5-xl
"""

FINETUNE_EXAMPLES = """
Examples:

  blip2 finetune caption --init-from Salesforce/blip2-opt-2.7b data.shards='["coco/{00000..00112}.tar"]'

  blip2 finetune retrieval --init-from blip2-data/runs/pretrain_stage1_vitg/final --nproc-per-node 8
"""

SCHEDULE_HELP = "Resume although train.max_steps or the learning-rate schedule differs from the checkpoint's."
LAUNCH_HELP = "Launch this many processes per node under torchrun (GPUs per node) [default: this process only]."


def _launch_options(nproc_per_node, nnodes, node_rank, rdzv_endpoint) -> bool:
    """Relaunch under torchrun when asked; True when this process was the launcher (and is done)."""
    if nproc_per_node is None or (nproc_per_node <= 1 and nnodes == "1"):
        return False
    from blip2cli.distributed import relaunch_under_torchrun

    code = relaunch_under_torchrun(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    raise typer.Exit(code)


def _run(plan, resume: str, dry_run: bool, device: str, allow_schedule_change: bool) -> None:
    from blip2cli.distributed import process_group_ended
    from blip2cli.training.launch import training_device
    from blip2cli.training.loop import train

    device = training_device(device)

    for note in plan.notes:
        stderr.print(f"[yellow]{note}[/yellow]")
    stderr.print(f"recipe {plan.recipe_name} -> {plan.run_dir} ({plan.shard_files} shard file(s))")
    with process_group_ended():  # a gloo rank leaving while rank 0 still saves aborts the job
        train(plan.recipe, plan.run_dir, plan.shards, resume=resume, dry_run=dry_run, device=device, console=stderr,
              allow_schedule_change=allow_schedule_change)


@app.command(
    epilog=PRETRAIN_EXAMPLES,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
)
def pretrain(
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides, key.sub=value."),
    stage: Optional[int] = typer.Option(None, "--stage", min=1, max=2, help="1: ITC/ITM/ITG with a frozen image encoder; 2: frozen LLM [default: the --recipe's model.stage; one of the two is needed]."),
    vision: Optional[str] = typer.Option(None, help="Image encoder: eva-vit-g, clip-vit-l, open_clip:..., hf:... [default: the recipe's]."),
    llm: Optional[str] = typer.Option(None, help="Stage 2: opt-2.7b, opt-6.7b, flant5-xl, flant5-xxl, a hub id or path [default: the recipe's]."),
    init_from: Optional[str] = typer.Option(None, help="Stage 2: the stage-1 checkpoint to start from [default: latest in workspace]."),
    recipe: Optional[str] = typer.Option(None, help="Recipe name (`blip2 recipes list`) or TOML file [default: by stage/vision/llm]."),
    out: Optional[Path] = typer.Option(None, help="Run directory [default: <root>/runs/RECIPE, the recipe's whole name]."),
    root: Optional[Path] = ROOT,
    resume: str = typer.Option("auto", help="auto (continue the run's latest checkpoint), never, or a checkpoint path."),
    allow_schedule_change: bool = typer.Option(False, "--allow-schedule-change", help=SCHEDULE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve, build, count parameters, load one batch, exit."),
    device: str = DEVICE,
    nproc_per_node: Optional[int] = typer.Option(None, help=LAUNCH_HELP),
    nnodes: str = typer.Option("1", help="Nodes (torchrun --nnodes)."),
    node_rank: int = typer.Option(0, help="This node's rank (torchrun --node-rank)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, help="host:port of the rendezvous (torchrun --rdzv-endpoint) [default: standalone, one node]."),
) -> None:
    """Pretrain BLIP-2: stage 1 (Q-Former representation learning) or stage 2 (frozen LLM)."""
    quiet_libraries()
    _launch_options(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    from blip2cli.training.launch import plan_pretrain

    plan = plan_pretrain(stage, recipe, overrides or [], vision=vision, llm=llm, init_from=init_from, out=out, root=root)
    _run(plan, resume, dry_run, device, allow_schedule_change)


@app.command(epilog=FINETUNE_EXAMPLES)
def finetune(
    task: str = typer.Argument(..., help="caption, vqa or retrieval."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides, key.sub=value."),
    init_from: Optional[str] = typer.Option(None, help="Checkpoint to fine-tune (stage 2 for caption/vqa, stage 1 for retrieval)."),
    recipe: Optional[str] = typer.Option(None, help="Recipe name or TOML file [default: the task's]."),
    out: Optional[Path] = typer.Option(None, help="Run directory [default: <root>/runs/RECIPE, the recipe's whole name]."),
    root: Optional[Path] = ROOT,
    resume: str = typer.Option("auto", help="auto (continue the run's latest checkpoint), never, or a checkpoint path."),
    allow_schedule_change: bool = typer.Option(False, "--allow-schedule-change", help=SCHEDULE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve, build, count parameters, load one batch, exit."),
    device: str = DEVICE,
    nproc_per_node: Optional[int] = typer.Option(None, help=LAUNCH_HELP),
    nnodes: str = typer.Option("1", help="Nodes (torchrun --nnodes)."),
    node_rank: int = typer.Option(0, help="This node's rank (torchrun --node-rank)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, help="host:port of the rendezvous (torchrun --rdzv-endpoint) [default: standalone, one node]."),
) -> None:
    """Fine-tune a BLIP-2 checkpoint for captioning, VQA or retrieval."""
    quiet_libraries()
    _launch_options(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    from blip2cli.training.launch import plan_finetune

    plan = plan_finetune(task, recipe, overrides or [], init_from, out=out, root=root)
    _run(plan, resume, dry_run, device, allow_schedule_change)



CACHE_EXAMPLES = """
Examples:

  blip2 cache-features --stage 1 --out blip2-data/features/vitg data.feature_cache_views=4

  blip2 pretrain --stage 1 data.feature_cache=blip2-data/features/vitg     # train from it

  blip2 cache-features --stage 1 --dry-run                                  # disk cost per image only
"""


@app.command("cache-features", epilog=CACHE_EXAMPLES)
def cache_features(
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides, key.sub=value."),
    stage: int = typer.Option(1, "--stage", min=1, max=2, help="Whose recipe builds the encoder (stage 1 and 2 share it)."),
    vision: Optional[str] = typer.Option(None, help="Image encoder (as for pretrain)."),
    recipe: Optional[str] = typer.Option(None, help="Recipe name or TOML file [default: by stage/vision]."),
    out: Optional[Path] = typer.Option(None, help="Cache directory [default: the recipe's data.feature_cache]."),
    root: Optional[Path] = ROOT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the disk cost per image and exit."),
    device: str = DEVICE,
) -> None:
    """Run the frozen image encoder once per image and view over the shards; training reads the features
    with data.feature_cache=DIR."""
    quiet_libraries()
    from blip2cli.training.feature_cache import build_feature_cache
    from blip2cli.training.launch import plan_pretrain

    plan = plan_pretrain(stage, recipe, overrides or [], vision=vision, out=None, root=root)
    build_feature_cache(plan.recipe, plan.shards, out, dry_run, device, stderr.print)

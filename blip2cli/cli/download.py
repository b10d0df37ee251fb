"""`blip2 download`: fetch data into the workspace.

Implemented: ``blip2 download pretrain DATASET --url-list FILE`` (img2dataset -> webdataset shards).
Not yet implemented: ``blip2 download eval TASK`` (official annotation files and images for vqav2,
gqa, okvqa, coco Karpathy, nocaps, flickr30k into ``<root>/eval/<task>/``; see issue 4). It belongs
in this sub-app, next to ``pretrain``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from blip2cli.cli import app

download_app = typer.Typer(
    name="download",
    help="Download pretraining data (and, later, evaluation sets) into the workspace.",
    no_args_is_help=True,
)
app.add_typer(download_app, name="download")

PRETRAIN_EXAMPLES = """
Examples:

  blip2 download pretrain cc3m --url-list cc3m.tsv                  # -> ./blip2-data/pretrain/cc3m/

  blip2 download pretrain laion --url-list laion-parts/ --processes 16 --threads 128

  blip2 download pretrain custom --url-list mine.csv --out shards/  # url column may hold local paths or file:// URLs

  BLIP2_HOME=/data/blip2 blip2 download pretrain coco --url-list coco.parquet --distributor pyspark

Rerun the same command to resume: finished shards are skipped.
"""


@download_app.command(epilog=PRETRAIN_EXAMPLES)
def pretrain(
    dataset: str = typer.Argument(..., help="coco, vg, cc3m, cc12m, sbu, laion or custom (sets the expected column names)."),
    url_list: Path = typer.Option(..., "--url-list", help="parquet/csv/tsv/jsonl/json file (or folder of them) with url and caption columns."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <root>/pretrain/DATASET)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Workspace root (default: $BLIP2_HOME, else ./blip2-data)."),
    image_size: int = typer.Option(224, "--image-size", help="Shorter side in pixels (BLIP-2 pretrains at 224)."),
    resize_mode: str = typer.Option("keep_ratio", "--resize-mode", help="keep_ratio, center_crop, border, keep_ratio_largest or no."),
    processes: int = typer.Option(1, "--processes", help="Download processes."),
    threads: int = typer.Option(64, "--threads", help="Download threads per process."),
    distributor: str = typer.Option("multiprocessing", "--distributor", help="multiprocessing, pyspark or ray."),
    shard_size: int = typer.Option(10000, "--shard-size", help="Samples per shard."),
    timeout: int = typer.Option(10, "--timeout", help="Seconds per request."),
    retries: int = typer.Option(0, "--retries", help="Retries per failed url."),
    url_col: Optional[str] = typer.Option(None, "--url-col", help="Url column, overriding the dataset's known name."),
    caption_col: Optional[str] = typer.Option(None, "--caption-col", help="Caption column, overriding the dataset's known name."),
) -> None:
    """Download an image-caption url list into webdataset shards with img2dataset (resumable)."""
    from blip2cli.data.download import download_pretrain
    from blip2cli.data.workspace import pretrain_dir

    out_dir = out if out is not None else pretrain_dir(dataset, root)
    summary = download_pretrain(
        dataset,
        url_list,
        out_dir,
        image_size=image_size,
        processes=processes,
        threads=threads,
        resize_mode=resize_mode,
        distributor=distributor,
        shard_size=shard_size,
        timeout=timeout,
        retries=retries,
        url_col=url_col,
        caption_col=caption_col,
    )

    table = Table(title=f"{dataset} -> {summary.out_dir}")
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_row("shards", f"{summary.shards} ({summary.shards_skipped} already done)")
    table.add_row("samples", str(summary.count))
    table.add_row("[green]successes[/green]", str(summary.successes))
    table.add_row("[red]failures[/red]", str(summary.failed))
    for reason, n in summary.failures.items():
        table.add_row(f"  {reason[:80]}", str(n))
    table.add_row("seconds", f"{summary.seconds:.1f}")
    Console().print(table)  # the summary is the command's result: stdout

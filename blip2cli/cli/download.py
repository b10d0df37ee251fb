"""`blip2 download`: fetch data into the workspace.

* ``blip2 download pretrain DATASET --url-list FILE``: img2dataset -> webdataset shards in
  ``<root>/pretrain/<dataset>/`` (:mod:`blip2cli.data.download`).
* ``blip2 download eval TASK``: official annotation files and images for vqav2, okvqa, gqa, coco
  (Karpathy), coco_retrieval, nocaps and flickr30k into ``<root>/eval/<task>/`` with a
  ``manifest.json`` that ``blip2 eval`` reads (:mod:`blip2cli.data.eval_download`).
* ``blip2 download model NAME...``: hub weights (checkpoints, LLMs, image encoders, what a recipe needs)
  into the Hugging Face cache, for use without network later (:mod:`blip2cli.hub`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from blip2cli.cli import app
from blip2cli.cli._common import ROOT

download_app = typer.Typer(
    name="download",
    help="Download pretraining data and evaluation sets into the workspace, and model weights for offline use.",
    no_args_is_help=True,
)
app.add_typer(download_app, name="download")

PRETRAIN_EXAMPLES = """
Examples:

  blip2 download pretrain cc3m --url-list cc3m.tsv                  # -> ./blip2-data/pretrain/cc3m/

  blip2 download pretrain laion --url-list laion-parts/ --processes 16 --threads 128

  blip2 download pretrain custom --url-list mine.csv --out shards/  # url column may hold local paths or file:// URLs

  BLIP2_HOME=/data/blip2 blip2 download pretrain coco --url-list coco.parquet --distributor pyspark

  blip2 download pretrain vqa --questions v2_OpenEnded_mscoco_train2014_questions.json \\
      --annotations v2_mscoco_train2014_annotations.json --images train2014/ --out vqa-shards/
      # VQA-format training files -> shards whose samples carry question + answers: stage 2 and
      # `blip2 finetune vqa` train the LLM on the answer, with the question as its (masked) prompt

Rerun the same command to resume: finished shards are skipped.
"""


@download_app.command(epilog=PRETRAIN_EXAMPLES)
def pretrain(
    dataset: str = typer.Argument(..., help="coco, vg, cc3m, cc12m, sbu, laion or custom (sets the expected column names), or vqa (VQA-format question/answer files)."),
    url_list: Optional[Path] = typer.Option(None, "--url-list", help="parquet/csv/tsv/jsonl/json file (or folder of them) with url and caption columns (every dataset but vqa)."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="vqa: official-format questions JSON."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="vqa: official-format annotations JSON (the answers)."),
    images: Optional[Path] = typer.Option(None, "--images", help="vqa: the image folder."),
    image_pattern: Optional[str] = typer.Option(None, "--image-pattern", help="vqa: image file name, e.g. 'COCO_train2014_{image_id:012d}.jpg' [default: COCO names or {image_id}.jpg]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder [default: <root>/pretrain/DATASET]."),
    root: Optional[Path] = ROOT,
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
    """Download an image-caption url list (or VQA-format files) into webdataset shards with img2dataset (resumable)."""
    from blip2cli.data.download import VqaSource, download_pretrain
    from blip2cli.data.workspace import pretrain_dir

    out_dir = out if out is not None else pretrain_dir(dataset, root)
    vqa = VqaSource(questions, annotations, images, image_pattern) if (questions or annotations or images) else None
    summary = download_pretrain(
        dataset,
        url_list,
        out_dir,
        vqa=vqa,
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


EVAL_EXAMPLES = """
Examples:

  blip2 download eval vqav2                       # -> ./blip2-data/eval/vqav2/ (+ manifest.json)

  blip2 download eval gqa --dry-run               # list the official files, fetch nothing

  blip2 download eval coco --split test --delete-archives

  blip2 download eval vqav2 --split val --split test-dev --out /data/vqav2

  blip2 download eval okvqa --mirror http://mirror.lan/blip2-eval   # same file names, local mirror

Tasks: vqav2, okvqa, gqa, coco, coco_retrieval (reuses coco's files), nocaps, flickr30k (images by
licence form: the command says what to fetch and where to put it). Interrupted downloads resume.
"""


@download_app.command("eval", epilog=EVAL_EXAMPLES)
def eval_(
    task: str = typer.Argument(..., help="vqav2, okvqa, gqa, coco, coco_retrieval, nocaps or flickr30k."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder [default: <root>/eval/TASK]."),
    root: Optional[Path] = ROOT,
    split: Optional[List[str]] = typer.Option(None, "--split", help="Split to fetch (repeatable) [default: the task's evaluation splits]."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Fetch every file as MIRROR/<file name> instead of the official URL."),
    threads: int = typer.Option(16, "--threads", help="Parallel downloads for per-image sources (nocaps)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds per request."),
    retries: int = typer.Option(3, "--retries", help="Retries per file (each resumes where the last stopped)."),
    delete_archives: bool = typer.Option(False, "--delete-archives", help="Delete archives once unpacked."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files that would be fetched and exit."),
) -> None:
    """Download an evaluation set's official annotations and images, then write manifest.json."""
    from blip2cli.cli._common import stderr
    from blip2cli.data.eval_download import data_dir_for, download_eval, manual_instructions, plan

    spec, splits, sources = plan(task, split)
    out_dir, data_dir = data_dir_for(task, out, root)
    if dry_run:
        print(f"{task}: {spec.description}\nfiles -> {data_dir}")
        for src in sources:
            size = f"{src.size:,} bytes" if src.size else "size not published (checked against Content-Length)"
            digest = "sha256" if src.sha256 else "md5" if src.md5 else "no published checksum"
            into = src.dest + (f" ({', '.join(src.members)})" if src.members else "")
            print(f"  {src.url}\n      {size}; {digest}; -> {into}")
        if spec.image_list is not None:
            print(f"+ every image listed in {spec.image_list.annotations} ({spec.image_list.url_key}) -> {spec.image_list.dest}/")
        if spec.manual is not None:
            print(manual_instructions(task, data_dir))
        print(f"splits: {', '.join(splits)}; manifest: {out_dir / 'manifest.json'}")
        return
    result = download_eval(
        task, out_dir, data_dir=data_dir, splits=splits, mirror=mirror, timeout=timeout, retries=retries,
        threads=threads, delete_archives=delete_archives, console=stderr,
    )
    print(f"{task}: {', '.join(result.splits)} ready; {result.bytes_downloaded / 1e6:.1f} MB downloaded "
          f"in {result.seconds:.1f} s; manifest {result.manifest}")


MODEL_EXAMPLES = """
Examples:

  blip2 download model Salesforce/blip2-opt-2.7b            # what `blip2 ask` uses by default

  blip2 download model pretrain_stage2_opt2.7b              # a recipe's parts: EVA ViT-g, BERT, OPT-2.7B

  blip2 download model opt-2.7b eva-vit-g hf:facebook/dinov2-small

  HF_HOME=/data/hf blip2 download model ./my_stage1.toml    # into another cache

Then, without network: HF_HUB_OFFLINE=1 blip2 ask photo.jpg (blip2 also reads the cache on its own, in a
few seconds, when the hub cannot be reached).
"""


@download_app.command("model", epilog=MODEL_EXAMPLES)
def model(
    names: List[str] = typer.Argument(..., help="Hub ids (owner/name), LLM presets (opt-2.7b...), image encoders (eva-vit-g, clip-vit-l, open_clip:MODEL:TAG, hf:ID) or recipes (their image encoder, BERT, LLM and init_from)."),
) -> None:
    """Fetch model weights into the Hugging Face cache ($HF_HOME/hub), for use without network later."""
    from blip2cli.cli._common import quiet_libraries, stderr
    from blip2cli.hub import download, download_targets, hub_cache

    quiet_libraries()
    targets = download_targets(names)
    if not targets:
        stderr.print("nothing to download: every part named is local or built from a config", highlight=False)
        return
    for target in targets:
        name = target.repo_id or ":".join(target.open_clip)
        with stderr.status(f"fetching {target.what} ({name})", spinner="dots") if stderr.is_terminal else contextlib.nullcontext():
            path = download(target)
        print(f"{target.what}: {name} -> {path}")
    stderr.print(f"{len(targets)} model(s) in {hub_cache()}; HF_HUB_OFFLINE=1 uses them without network",
                 highlight=False)

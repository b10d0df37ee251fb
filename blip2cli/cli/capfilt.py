"""`blip2 capfilt`: caption web images with BLIP, rank with CLIP, keep the top 2 (see blip2cli.data.capfilt)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from blip2cli.cli import app
from blip2cli.cli._common import DEVICE, ROOT, dtype_option

CAPFILT_EXAMPLES = """
Examples:

  blip2 capfilt --dataset laion                          # <root>/pretrain/laion -> <root>/capfilt/laion

  blip2 capfilt --shards 'shards/{00000..00099}.tar' --out capfilt/ --batch-size 64

  torchrun --nproc-per-node 8 -m blip2cli capfilt --dataset cc12m     # shards split over the 8 GPUs

  blip2 capfilt --dataset cc3m --rank 3 --world-size 16   # node 3 of 16 without torchrun

  blip2 capfilt --shards in/ --out out/ --captioner ./my-blip --clip-model ViT-B-16 --clip-pretrained laion2b_s34b_b88k

Rerun the same command to resume: finished output shards are skipped (--restart redoes them). Paper defaults: 10 captions per
image (nucleus, top-p 0.9, prompt "a picture of"), ranked with the web caption by CLIP ViT-L/14 (OpenAI),
top 2 kept in json["captions"].
"""


@app.command(epilog=CAPFILT_EXAMPLES)
def capfilt(
    shards: Optional[List[str]] = typer.Option(None, "--shards", help="Input shards: brace pattern, glob, folder or files (repeatable) [default: <root>/pretrain/DATASET]."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name for the workspace defaults [default with --shards: the shards' folder name]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder [default: <root>/capfilt/DATASET]."),
    root: Optional[Path] = ROOT,
    captioner: str = typer.Option("Salesforce/blip-image-captioning-large", "--captioner", help="BLIP captioning model: hub id or local folder."),
    clip_model: str = typer.Option("ViT-L-14", "--clip-model", help="open_clip model name, hf-hub:/local-dir: id, or a model-config .json."),
    clip_pretrained: str = typer.Option("openai", "--clip-pretrained", help="open_clip pretrained tag or local weights file ('' for none)."),
    num_captions: int = typer.Option(10, "--num-captions", help="Captions sampled per image."),
    top_k: int = typer.Option(2, "--top-k", help="Captions kept per image (best first)."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling threshold."),
    min_length: int = typer.Option(10, "--min-length", help="Minimum caption length in tokens, prompt included."),
    max_length: int = typer.Option(30, "--max-length", help="Maximum caption length in tokens, prompt included."),
    prompt: str = typer.Option("a picture of", "--prompt", help="Captioner prompt (stripped from the captions)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (mixed with each shard's name)."),
    device: str = DEVICE,
    dtype: str = dtype_option("Models' dtype. auto: bfloat16 on a GPU that supports it, else float16 on a GPU, float32 on the CPU."),
    rank: Optional[int] = typer.Option(None, "--rank", help="This process's rank [default: $RANK, else 0]."),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="Number of processes [default: $WORLD_SIZE, else 1]."),
    keep_candidates: bool = typer.Option(False, "--keep-candidates", help="Also store every scored candidate in the json."),
    max_image_pixels: Optional[int] = typer.Option(None, min=1, help="Skip (and count) images larger than this [default: 50 megapixels or $BLIP2_MAX_IMAGE_PIXELS]."),
    restart: bool = typer.Option(False, "--restart", help="Redo shards whose output already exists (start over)."),
    overwrite: bool = typer.Option(False, "--overwrite", hidden=True, help="Old name of --restart."),
) -> None:
    """CapFilt webdataset shards: BLIP captions + web caption, ranked by CLIP, top 2 into json["captions"]."""
    from blip2cli.cli._common import quiet_libraries, stderr
    from blip2cli.data.capfilt import CapfiltSettings, run_capfilt
    from blip2cli.data.training import expand_shards
    from blip2cli.data.workspace import capfilt_dir, pretrain_dir
    from blip2cli.errors import Blip2Error

    quiet_libraries()
    if not shards and not dataset:
        raise Blip2Error("give --shards or --dataset (which reads <root>/pretrain/DATASET)")
    inputs = expand_shards(shards if shards else str(pretrain_dir(dataset, root)))
    dataset = dataset or Path(inputs[0]).parent.name
    if any("://" in s or s.startswith("pipe:") for s in inputs):
        raise Blip2Error("capfilt reads local shards only; download them first")
    settings = CapfiltSettings(
        captioner=captioner, clip_model=clip_model, clip_pretrained=clip_pretrained or None, prompt=prompt,
        num_captions=num_captions, top_k=top_k, top_p=top_p, min_length=min_length, max_length=max_length,
        batch_size=batch_size, seed=seed, keep_candidates=keep_candidates,
        max_image_pixels=max_image_pixels,
    )
    out_dir = out if out is not None else capfilt_dir(dataset, root)
    s = run_capfilt(inputs, out_dir, settings, rank=rank, world_size=world_size, device=device, dtype=dtype,
                    overwrite=restart or overwrite, console=stderr)

    title = f"capfilt -> {s.out_dir}" + (f" (rank {s.rank} of {s.world_size})" if s.world_size > 1 else "")
    table = Table(title=title)
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_row("shards", f"{s.assigned} ({s.skipped} already done, {s.written} written)")
    table.add_row("samples read", str(s.samples))
    table.add_row("[green]captioned[/green]", str(s.captioned))
    table.add_row("[red]corrupt images[/red]", str(s.corrupt))
    table.add_row("[red]no image[/red]", str(s.no_image))
    table.add_row("[red]too large[/red]", str(s.too_large))
    table.add_row("images/s", f"{s.images_per_second:.1f}")
    table.add_row("seconds", f"{s.seconds:.1f}")
    f = s.folder
    if f:
        table.add_row("folder total (all runs, all ranks)",
                      f"{f['shards']} shards, {f['written']} captioned, {f['corrupt']} corrupt, {f['no_image']} no image, "
                      f"{f['too_large']} too large")
    Console().print(table)
    if s.failed:
        raise Blip2Error(f"{len(s.failed)} input shard(s) could not be read (first: {s.failed[0]}); fix or remove them and rerun")

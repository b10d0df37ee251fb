"""`blip2 embed`, `blip2 match`, `blip2 search`: features, image-text matching and an embedding index
(see blip2cli.inference.features)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional

import typer

from blip2cli.cli import _generation as G
from blip2cli.cli import app
from blip2cli.cli._common import quiet_libraries, stderr
from blip2cli.hub import DEFAULT_RETRIEVAL_MODEL

MODEL = typer.Option(DEFAULT_RETRIEVAL_MODEL, "--model", "-m", help="Stage-1 checkpoint (stage 2: image embeddings only): checkpoint directory, run directory or hub id. The default is the released stage-1 (Q-Former retrieval) model.")
JSON_OUTPUT = typer.Option(False, "--json", help="JSON lines on stdout instead of a table.")

EMBED_EXAMPLES = """
Examples:

  blip2 embed photos/ --out index/photos                 # image embeddings (N, 32, 256), normalised

  blip2 embed --texts captions.txt --out index/captions   # text embeddings (N, 256), one text per line

  blip2 embed --pairs pairs.jsonl --out index/mm          # multimodal query outputs of image-text pairs

  blip2 embed 'shards/{00000..00099}.tar' --out index/laion --format numpy --shard-size 50000

The index folder holds index.json and shards of embeddings (safetensors or .npy) with their items as
JSONL. Rerun the same command to resume after an interruption. Search it with `blip2 search`.
"""


@app.command(epilog=EMBED_EXAMPLES)
def embed(
    inputs: Optional[List[str]] = typer.Argument(None, help="Images: files, folders, globs, .txt lists, .tar shards."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to write (resumable)."),
    texts: Optional[Path] = typer.Option(None, "--texts", help="Embed texts instead: .txt (one per line) or .jsonl ('text' or 'caption')."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help='Multimodal embeddings of {"image": ..., "text": ...} JSONL lines.'),
    model: str = MODEL,
    fmt: str = typer.Option("safetensors", "--format", metavar="<safetensors|numpy>", help="Embedding files: safetensors or numpy (.npy)."),
    shard_size: int = typer.Option(10000, "--shard-size", min=1, help="Items per index shard (the unit of resuming)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Items per forward pass."),
    workers: int = G.WORKERS,
    device: str = G.DEVICE,
    dtype: str = G.DTYPE,
    restart: bool = G.RESTART,
) -> None:
    """Image, text or multimodal embeddings into a searchable index (the reference feature extractor's)."""
    quiet_libraries()
    from blip2cli.errors import Blip2Error
    from blip2cli.inference.features import build_index, read_pairs, read_texts
    from blip2cli.inference.inputs import collect_images

    if sum(x is not None and x != [] for x in (inputs or None, texts, pairs)) != 1:
        raise Blip2Error("give images, or --texts FILE, or --pairs FILE (one of them)")
    kind = "text" if texts else "multimodal" if pairs else "image"
    items = read_texts(texts) if texts else read_pairs(pairs) if pairs else collect_images(inputs)
    extractor = _extractor(model, device, dtype)
    result = build_index(extractor, kind, items, out, model_name=_model_id(model), shard_size=shard_size, fmt=fmt,
                         batch_size=batch_size, num_workers=workers, restart=restart)
    stderr.print(f"{result.embedded} {kind} embeddings ({result.items_per_second:.1f}/s), {result.reused} already "
                 f"done, {len(result.failed)} unreadable skipped -> {result.out}", highlight=False, soft_wrap=True)
    for _, reason in result.failed[:5]:
        stderr.print(f"[red]skipped[/red] {reason}", highlight=False, soft_wrap=True)


MATCH_EXAMPLES = """
Examples:

  blip2 match photo.jpg "a dog on a beach" "a cat on a sofa"

  blip2 match photo.jpg "a dog on a beach" --json

ITM: the matching head's probability that the text describes the image. ITC: the best cosine similarity
between the image's query embeddings and the text embedding (no temperature).
"""


@app.command(epilog=MATCH_EXAMPLES)
def match(
    image: str = typer.Argument(..., help="Image path or http(s) URL."),
    texts: List[str] = typer.Argument(..., help="One or more texts."),
    model: str = MODEL,
    json_output: bool = JSON_OUTPUT,
    device: str = G.DEVICE,
    dtype: str = G.DTYPE,
) -> None:
    """Image-text matching (ITM probability) and similarity (ITC) of one image and some texts."""
    quiet_libraries()
    from blip2cli.images import load_image

    picture = load_image(image)
    rows = _extractor(model, device, dtype).match(picture, texts)
    _print_rows(rows, ["text", "itm", "itc"], json_output)


SEARCH_EXAMPLES = """
Examples:

  blip2 search index/photos "a dog playing in the snow"            # images for a text

  blip2 search index/captions --image photo.jpg --top-k 3          # texts for an image

  blip2 search index/photos "a red bus" --rerank 32                # ITM re-ranks the 32 best by ITC

The model defaults to the one that built the index.
"""


@app.command(epilog=SEARCH_EXAMPLES)
def search(
    index: Path = typer.Argument(..., help="Index folder written by blip2 embed."),
    text: Optional[str] = typer.Argument(None, help="Text query (for an image index)."),
    image: Optional[str] = typer.Option(None, "--image", help="Image query (for a text index)."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Results to show."),
    rerank: int = typer.Option(0, "--rerank", min=0, help="Re-rank the best N by ITC with ITM logit + ITC (0 = off)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint directory, run directory or hub id [default: the one that built the index]."),
    json_output: bool = JSON_OUTPUT,
    device: str = G.DEVICE,
    dtype: str = G.DTYPE,
) -> None:
    """Top-k items of an embedding index for a text or an image, optionally re-ranked by ITM."""
    quiet_libraries()
    from blip2cli.images import load_image
    from blip2cli.inference.features import read_index
    from blip2cli.inference.features import search as run_search

    info = read_index(index)
    picture = load_image(image) if image is not None else None
    extractor = _extractor(model or info.model, device, dtype)
    rows = run_search(extractor, index, text=text, image=picture, top_k=top_k, rerank=rerank)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    item = "text" if info.kind == "text" else "image"
    columns = ["rank", item, "itc"] + (["itm", "score"] if rerank else [])
    for row in rows:
        if "shard" in row:
            row["image"] = f"{row['shard']}/{row['key']}"
    _print_rows(rows, columns, json_output)


def _extractor(model: str, device: str, dtype: str):
    from blip2cli.checkpoint import load_model
    from blip2cli.inference import resolve_dtype
    from blip2cli.inference.features import FeatureExtractor

    torch_device = G.device_for_rank(device)
    with stderr.status(f"loading {model}", spinner="dots") if stderr.is_terminal else contextlib.nullcontext():
        loaded = load_model(model, dtype=resolve_dtype(dtype, torch_device), device=torch_device)
    return FeatureExtractor(loaded, torch_device)


def _model_id(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _print_rows(rows, columns, json_output: bool) -> None:
    if json_output:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in columns:
        left = column in ("text", "image")
        table.add_column(column, justify="left" if left else "right", overflow="fold" if left else "ellipsis")
    for row in rows:
        table.add_row(*[f"{row.get(c):.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns])
    Console().print(table)

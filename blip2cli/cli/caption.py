"""`blip2 caption`: captions for many images, batched, into a resumable JSONL (see blip2cli.inference.batch)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from blip2cli.cli import _generation as G
from blip2cli.cli import app
from blip2cli.cli._common import quiet_libraries

EXAMPLES = """
Examples:

  blip2 caption photos/ --out captions.jsonl             # every image below photos/, 8 at a time

  blip2 caption 'photos/**/*.jpg' list.txt --out captions.jsonl --batch-size 32

  blip2 caption 'shards/{00000..00099}.tar' --out captions.jsonl --model Salesforce/blip2-opt-6.7b --quantize 8bit

  blip2 caption photo.jpg --prompt "a photo of"           # JSON lines on stdout without --out

  blip2 caption "shards/*.tar" --out-shards captioned/     # shards again, json["blip2_caption"] added

  torchrun --nproc-per-node 4 -m blip2cli caption photos/ --out captions.jsonl    # data-parallel

Each record is {"image": PATH, "caption": TEXT} ({"shard", "key", "caption"} for shards). Rerun the same
command to resume: images already in --out are not captioned again. Unreadable images are skipped and
counted. Same settings and outputs as `blip2 ask IMAGE` for each image.
"""


@app.command(epilog=EXAMPLES)
def caption(
    inputs: List[str] = typer.Argument(..., help="Images: files, URLs, folders, glob patterns, .txt lists, .tar shards."),
    model: str = G.MODEL,
    prompt: Optional[str] = G.PROMPT,
    num_beams: Optional[int] = G.NUM_BEAMS,
    max_new_tokens: Optional[int] = G.MAX_NEW_TOKENS,
    min_new_tokens: Optional[int] = G.MIN_NEW_TOKENS,
    length_penalty: Optional[float] = G.LENGTH_PENALTY,
    repetition_penalty: float = G.REPETITION_PENALTY,
    sample: bool = G.SAMPLE,
    top_p: float = G.TOP_P,
    temperature: float = G.TEMPERATURE,
    seed: Optional[int] = G.SEED,
    device: str = G.DEVICE,
    dtype: str = G.DTYPE,
    quantize: Optional[str] = G.QUANTIZE,
    device_map: Optional[str] = G.DEVICE_MAP,
    out: Optional[Path] = G.OUT,
    batch_size: int = G.BATCH_SIZE,
    workers: int = G.WORKERS,
    out_shards: Optional[Path] = G.OUT_SHARDS,
    restart: bool = G.RESTART,
) -> None:
    """Caption many images in batches: one JSON record per image, resumable."""
    quiet_libraries()
    import torch

    from blip2cli.inference.batch import caption_jobs
    from blip2cli.inference.inputs import collect_images

    jobs = caption_jobs(collect_images(inputs))  # fail on bad input before loading the model
    if seed is not None:
        torch.manual_seed(seed)
    assistant = G.load_assistant(model, device, dtype, quantize, device_map)
    flags = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                 length_penalty=length_penalty, prompt=prompt)
    fixed = dict(repetition_penalty=repetition_penalty, sample=sample, top_p=top_p, temperature=temperature)
    caption_prompt, options, notes = assistant.resolve("caption", flags, **fixed)
    G.print_notes(notes)
    G.run_many(assistant, jobs, caption_prompt, options, model, out, batch_size, workers, restart, out_shards)

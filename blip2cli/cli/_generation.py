"""Options and the shared batch path of `blip2 ask` and `blip2 caption` (parse, call, print; no logic)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import typer

from blip2cli.cli._common import DEVICE, DTYPE, stderr  # noqa: F401  (DEVICE, DTYPE: re-exported for ask/caption/embed)
from blip2cli.hub import DEFAULT_MODEL

# --------------------------------------------------------------------------- options both commands take
MODEL = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Checkpoint directory, run directory or hub id. The default is the smallest released stage-2 BLIP-2 (8 GB in float16); `blip2 eval` defaults to the checkpoint the paper reports each task with instead.")
PROMPT = typer.Option(None, "--prompt", help="Text the caption continues (captioning only), e.g. 'a photo of' [default: the checkpoint's caption prompt, else none].")
PROMPT_TEMPLATE = typer.Option(
    None, "--prompt-template", help="VQA prompt; {} is the question [default: the one the checkpoint was trained with, "
    "else 'Question: {} Answer:' (decoder-only LLMs) or 'Question: {} Short answer:' (encoder-decoder)]."
)
NUM_BEAMS = typer.Option(None, "--num-beams", min=1, help="Beam width, 1 = greedy [default: the checkpoint's, else 5].")
MAX_NEW_TOKENS = typer.Option(None, "--max-new-tokens", min=1, help="Generated tokens at most [default: the checkpoint's, else 30 for captions, 10 for answers].")
MIN_NEW_TOKENS = typer.Option(None, "--min-new-tokens", min=0, help="Generated tokens at least [default: the checkpoint's, else 1].")
LENGTH_PENALTY = typer.Option(None, "--length-penalty", help="Beam-search length penalty, negative favours short outputs [default: the checkpoint's, else 1.0].")
REPETITION_PENALTY = typer.Option(1.0, "--repetition-penalty", help="Repetition penalty, 1.0 = none.")
SAMPLE = typer.Option(False, "--sample", help="Nucleus sampling instead of beam search.")
TOP_P = typer.Option(0.9, "--top-p", help="Nucleus probability mass when sampling.")
TEMPERATURE = typer.Option(1.0, "--temperature", help="Softmax temperature when sampling.")
SEED = typer.Option(None, "--seed", help="Random seed (for --sample) [default: not seeded].")
QUANTIZE = typer.Option(None, "--quantize", help="Load the frozen LLM in 8bit or 4bit (bitsandbytes, CUDA; `pip install blip2cli[lowmem]`) [default: not quantized].")
DEVICE_MAP = typer.Option(None, "--device-map", help="'auto': spread the frozen LLM over GPU(s), CPU and disk (accelerate) to fit large checkpoints [default: all on --device].")
# many images
OUT = typer.Option(None, "--out", "-o", help="JSONL output, one record per image, written as it goes; rerun to resume [default: stdout, not resumable].")
BATCH_SIZE = typer.Option(8, "--batch-size", min=1, help="Images per generation batch.")
WORKERS = typer.Option(min(4, os.cpu_count() or 1), "--workers", min=0, help="Image-decoding worker processes.")
OUT_SHARDS = typer.Option(None, "--out-shards", help="Also write copies of the input .tar shards here, each {key}.json gaining blip2_caption (or blip2_question/blip2_answer) [JSONL default: DIR/outputs.jsonl].")
RESTART = typer.Option(False, "--restart", help="Discard the records already in --out and start over.")


def load_assistant(model: str, device: str, dtype: str, quantize: Optional[str], device_map: Optional[str]):
    """A ``Blip2Assistant`` on this process's device (a spinner while loading)."""
    from blip2cli.inference import Blip2Assistant
    from blip2cli.inference.lowmem import load_for_inference

    with stderr.status(f"loading {model}", spinner="dots") if stderr.is_terminal else contextlib.nullcontext():
        loaded, torch_device = load_for_inference(model, device_for_rank(device), dtype, quantize, device_map)
    return Blip2Assistant(loaded, torch_device)


def device_for_rank(name: str):
    """The device, or this rank's GPU under torchrun (where the process group is started here)."""
    from blip2cli.distributed import init_distributed, launch_rank_and_world
    from blip2cli.inference import resolve_device

    if launch_rank_and_world()[1] > 1:
        return init_distributed(name).device
    return resolve_device(name)


def print_notes(notes) -> None:
    for note in notes:
        stderr.print(f"[yellow]{note}[/yellow]", highlight=False)


def run_many(assistant, jobs, prompt: str, options, model: str, out: Optional[Path], batch_size: int, workers: int,
             restart: bool, out_shards: Optional[Path] = None) -> None:
    """Batched generation over ``jobs`` into ``out`` (or stdout), then a one-line summary on stderr; with
    ``out_shards``, the input shards rewritten with the outputs."""
    from blip2cli.distributed import group_rank_and_world as rank_and_world
    from blip2cli.distributed import process_group_ended
    from blip2cli.errors import Blip2Error
    from blip2cli.inference.batch import BatchSettings, run_batch, write_output_shards

    shards = sorted({job.image.source for job in jobs if job.image.member is not None})
    if out_shards is not None:
        if not shards:
            raise Blip2Error("--out-shards needs .tar shards as input")
        out = out if out is not None else out_shards / "outputs.jsonl"

    model_id = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else model
    settings = BatchSettings(model=model_id, prompt=prompt, options=options)
    with process_group_ended():
        rank = rank_and_world()[0]
        result = run_batch(assistant, jobs, settings, out, batch_size=batch_size, num_workers=workers, restart=restart)
    if rank != 0:
        return
    where = f" -> {result.out}" if result.out is not None else ""
    stderr.print(f"{result.generated} generated ({result.images_per_second:.2f} images/s), {result.reused} already "
                 f"done, {len(result.failed)} unreadable skipped{where}", highlight=False, soft_wrap=True)
    for key, reason in result.failed[:5]:
        stderr.print(f"[red]skipped[/red] {reason}", highlight=False, soft_wrap=True)
    if len(result.failed) > 5:
        stderr.print(f"... and {len(result.failed) - 5} more", highlight=False)
    if out_shards is not None:
        counts = write_output_shards(out, out_shards, shards)
        stderr.print(f"{counts['shards']} shards written to {out_shards} ({counts['skipped_shards']} already there), "
                     f"{counts['samples']} samples, {counts['left_out']} without an output left out", highlight=False,
                     soft_wrap=True)

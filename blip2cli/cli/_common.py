"""Small helpers shared by subcommands: quiet library logging, stderr console, and the options several
commands take (one name, one spelling and one set of values for each)."""

from __future__ import annotations

import os
import re
from typing import Optional

import typer
from rich.console import Console

from blip2cli.errors import Blip2Error

stderr = Console(stderr=True)

# --------------------------------------------------------------------------- options shared by commands
ROOT = typer.Option(None, "--root", help="Workspace root [default: $BLIP2_HOME, else ./blip2-data].")

DEVICE_HELP = ("auto, cpu, cuda or cuda:N. auto: the GPU when there is one (under torchrun, each process's own), "
               "else the CPU.")
DEVICE_METAVAR = "<auto|cpu|cuda|cuda:N>"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The short spellings some tools use; accepted, shown as the names above.
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_METAVAR = "<" + "|".join(DTYPES) + ">"


def check_device(value: Optional[str]) -> Optional[str]:
    if value is None or re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    raise Blip2Error(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")


def check_dtype(value: Optional[str]) -> Optional[str]:
    """One of ``DTYPES`` (the short spellings fp32, bf16, fp16 are read as those)."""
    if value is None:
        return value
    name = DTYPE_ALIASES.get(value.lower(), value.lower())
    if name not in DTYPES:
        raise Blip2Error(f"unknown dtype {value!r}; use {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
    return name


def device_option(default: str = "auto", help: str = DEVICE_HELP):
    return typer.Option(default, "--device", metavar=DEVICE_METAVAR, callback=check_device, help=help)


def dtype_option(help: str):
    return typer.Option("auto", "--dtype", metavar=DTYPE_METAVAR, callback=check_dtype, help=help)


DEVICE = device_option()
DTYPE = dtype_option("Weights' dtype (frozen parts; trainable ones stay float32). auto: bfloat16 on a GPU that "
                     "supports it, else float32.")


def quiet_libraries() -> None:
    """Keep stdout for results: silence transformers' progress bars and advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # older huggingface_hub
        pass

"""Small helpers shared by subcommands: quiet library logging, stderr console."""

from __future__ import annotations

import os

from rich.console import Console

stderr = Console(stderr=True)


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

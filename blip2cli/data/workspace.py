"""The blip2 workspace: one root folder where data commands write and later commands look.

The root is, in order of precedence, an explicit ``--root``, the ``BLIP2_HOME`` environment
variable, or ``./blip2-data``. Layout (every command still accepts explicit paths instead)::

    <root>/
      pretrain/<dataset>/   webdataset shards from `blip2 download pretrain`
                            (00000.tar, 00000.parquet, 00000_stats.json, ...)
      capfilt/<dataset>/    CapFilt shards from `blip2 capfilt` (same keys, ranked captions)
      eval/<task>/          evaluation annotations and images from `blip2 download eval`
      runs/<name>/          training runs and checkpoints

Nothing here creates folders; the functions only name paths.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "BLIP2_HOME"
DEFAULT_ROOT = "blip2-data"


def workspace_root(root: str | os.PathLike | None = None) -> Path:
    """The workspace root: ``root`` if given, else ``$BLIP2_HOME``, else ``./blip2-data``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_ROOT)


def pretrain_dir(dataset: str, root: str | os.PathLike | None = None) -> Path:
    """Where `blip2 download pretrain DATASET` writes its shards."""
    return workspace_root(root) / "pretrain" / dataset


def capfilt_dir(dataset: str, root: str | os.PathLike | None = None) -> Path:
    """Where `blip2 capfilt` writes the CapFilt shards for DATASET."""
    return workspace_root(root) / "capfilt" / dataset


def eval_dir(task: str, root: str | os.PathLike | None = None) -> Path:
    """Where `blip2 download eval TASK` puts annotations and images."""
    return workspace_root(root) / "eval" / task


def runs_dir(name: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """The runs folder, or one run inside it."""
    base = workspace_root(root) / "runs"
    return base / name if name else base

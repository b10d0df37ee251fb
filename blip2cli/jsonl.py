"""Append-only JSONL files that survive being killed mid-write (``blip2 eval``'s predictions, ``blip2 caption``).

A process killed while writing leaves at most one torn line, the last. Readers skip it; writers cut it off
before appending, so the file stays one valid JSON object per line and the item it held is simply redone.
Each append is flushed and fsynced, so every record written before a kill is kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def iter_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file in order; blank, torn or non-object lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def cut_torn_tail(path: str | os.PathLike) -> int:
    """Truncate a file that does not end with a newline back to its last complete line (what a kill during
    ``append_records`` leaves). Returns the number of bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the previous newline, a block at a time.
        end, block = size, 1 << 16
        keep = 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append one JSON line per record, after cutting off a torn last line; flushed and fsynced."""
    cut_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

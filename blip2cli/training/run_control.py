"""What keeps a training run whole while operators and schedulers act on it.

- ``RunLock``: one writer per run directory. ``RUN/.lock`` is held with ``flock`` for the life of the
  process, so the kernel releases it when the process dies in any way (SIGKILL included); the file names
  its owner (host, pid, start time) for the message a second writer gets. A file that still names an
  owner when the lock is free is a stale lock, taken over with a line. ``flock`` also works across hosts
  on NFS (Linux emulates it with NFS byte-range locks).
- ``StopSignals``: SIGTERM (schedulers, ``kill``, ``timeout``, Kubernetes) and SIGUSR1 (SLURM's
  ``--signal`` warning before the time limit) ask the run to stop after the current step: it saves a
  checkpoint and exits non-zero. Every rank reaches the same decision at the same step (``agreed``), so
  collectives stay matched and the save under FSDP, a collective itself, is safe. A second signal
  exits at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from blip2cli.errors import Blip2Error

LOCK_FILENAME = ".lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunDirectoryBusy(Blip2Error):
    pass


class TrainingStopped(Blip2Error):
    """The run stopped on a signal after saving; the exit status is the shell's for that signal."""

    heading = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunLock:
    """An exclusive lock on a run directory (see the module docstring). A context manager."""

    def __init__(self, run_dir: Path, say: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_FILENAME
        self.say = say
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _describe(_read_owner(fd))
            os.close(fd)
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by {owner}: one training process per run directory "
                f"(wait for it, stop it, or choose another --out)"
            ) from None
        previous = _read_owner(fd)
        if previous:
            self.say(f"taking over the stale lock of {_describe(previous)} on {self.path.parent} "
                     "(that process is gone)")
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: a clean exit, not a stale owner (never unlinked: see flock)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_owner(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(owner: dict) -> str:
    if not owner or "pid" not in owner:
        return "another process"
    return f"pid {owner['pid']} on {owner.get('host', '?')} (since {owner.get('started', '?')})"


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Turns SIGTERM/SIGUSR1 into a stop request checked between optimizer steps. A context manager that
    restores the previous handlers; outside the main thread (where Python cannot install handlers) it
    does nothing."""

    def __init__(self, say: Callable[[str], None] = print):
        self.say = say
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            self._restore()
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second signal: leave now; the last checkpoint is intact
            os.write(2, f"blip2: {signal_name(signum)} again: exiting at once\n".encode())
            os._exit(128 + signum)
        self.received = signum
        os.write(2, f"blip2: {signal_name(signum)} received: saving after this step "
                    "(send it again to exit at once)\n".encode())

    def agreed(self, device: torch.device, distributed: bool) -> int | None:
        """The signal to stop on, as every rank sees it: one rank's signal stops all of them at this step."""
        if not distributed:
            return self.received
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

"""Everything about several processes, in one place: who this process is, the process group under torchrun,
collectives on plain Python values, and relaunching the current command under torchrun.

Two questions with two answers: ``launch_rank_and_world`` reads what torchrun (or the user) says this
process is (``RANK``/``WORLD_SIZE``), before any process group exists; ``group_rank_and_world`` asks the
initialised process group (what collectives will span). With one process nothing here touches
``torch.distributed``: training runs on a CPU or a single GPU without a process group (LAVIS crashed there,
#537). Model code uses only ``group_rank_and_world``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def group_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launch_rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun's ``RANK``/``WORLD_SIZE``, else (0, 1); one-line errors for bad values."""
    from blip2cli.errors import Blip2Error

    try:
        r = rank if rank is not None else int(os.environ.get("RANK", "0"))
        w = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise Blip2Error(f"RANK/WORLD_SIZE must be integers: {err}") from None
    if w < 1 or not 0 <= r < w:
        raise Blip2Error(f"rank {r} is not in [0, {w}) (world size {w})")
    return r, w


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    _, world = group_rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if group_rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment; start a process group only when there is more than one process."""
    rank, world_size = launch_rank_and_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            **({"device_id": torch_device} if use_cuda else {}),
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def shutdown(wait_for_all: bool = True) -> None:
    """End the process group. ``wait_for_all``: every rank arrives before any tears down (a gloo rank that
    destroyed the group while another was still busy, rank 0 writing the final checkpoint, aborted with
    "terminate called without an active exception"); pass False when leaving on an error, where the other
    ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group_ended():
    """Run a command's work, then end the process group as ``shutdown`` does (without waiting for the other
    ranks when leaving on an error). Nothing to do outside torchrun."""
    try:
        yield
    finally:
        shutdown(wait_for_all=sys.exc_info()[0] is None)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_across_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalars over ranks (for logging)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    tensor /= env.world_size
    return dict(zip(keys, tensor.tolist()))


def sum_counts_across_ranks(counts: dict[str, int], env: DistEnv) -> dict[str, int]:
    if not env.distributed:
        return counts
    total: dict[str, int] = {}
    for part in all_gather_objects(counts):
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def relaunch_under_torchrun(
    nproc_per_node: int,
    nnodes: str = "1",
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    argv: list[str] | None = None,
) -> int:
    """Run ``python -m blip2cli <argv without launcher flags>`` under torchrun and return its exit code.

    torchrun's own parser and launcher do the work (``torch.distributed.run``); nothing is scheduled here.
    SIGTERM and SIGUSR1 (SLURM's ``--signal``) are forwarded to every rank, which saves and stops
    (``run_control.StopSignals``); ranks get ``STOP_GRACE_S`` to do so before torchrun kills them.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.run import get_args_parser, run

    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={STOP_GRACE_S}"]
    if rdzv_endpoint:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        args += ["--standalone"] if nnodes == "1" else []
    args += ["-m", "blip2cli", *(argv if argv is not None else strip_launcher_flags(sys.argv[1:]))]
    try:
        run(get_args_parser().parse_args(args))
    except SignalException as err:  # forwarded to the ranks, which said where they saved
        print(f"blip2: stopped: {err.sigval.name} forwarded to every rank", file=sys.stderr)
        return 128 + int(err.sigval)
    except Exception as err:  # torchrun raises ChildFailedError with the failing rank's details
        print(f"blip2: error: a training process failed: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


# torchrun's default set plus SIGUSR1, the pre-emption warning of SLURM's --signal.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
STOP_GRACE_S = 120  # seconds the ranks get to finish their step and save before torchrun sends SIGKILL

LAUNCHER_FLAGS = {"--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint"}


def strip_launcher_flags(argv: list[str]) -> list[str]:
    """Drop the launcher flags (and their values) so the children do not relaunch themselves."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCHER_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out

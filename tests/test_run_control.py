"""Runs that survive their operators: SIGTERM saves, one metrics record per step, one writer per run
directory, checkpoints that survive SIGKILL mid-write, schedule changes refused, image bombs counted."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from blip2cli.errors import Blip2Error, CheckpointError
from blip2cli.recipes import load_recipe
from blip2cli.training.checkpointing import (
    find_checkpoint,
    load_training_checkpoint,
    point_latest_at,
    save_training_checkpoint,
    step_dir_name,
)
from blip2cli.training.loggers import trim_records
from blip2cli.training.loop import train
from blip2cli.training.run_control import LOCK_FILENAME, RunDirectoryBusy, RunLock
from tests import tiny

FAST = ["train.log_every=1", "data.shuffle_buffer=16", "optim.warmup_steps=2"]
STEPS = 8
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny.write_shards(tmp_path_factory.mktemp("shards"), num_shards=2, per_shard=12, corrupt=1)


def _recipe(*overrides):
    return load_recipe("tiny_stage1", [*FAST, f"train.max_steps={STEPS}", "train.save_every=0", *overrides])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(_recipe(), run_dir, shards, device="cpu")
    return run_dir


# `blip2 pretrain` as its console script runs it, with each step taking at least 0.25 s: tiny steps take
# milliseconds, and the test must see a step's record before the run is over to signal it mid-run.
SLOW_CLI = """
import functools, sys, time
import blip2cli.training.loop as loop
loop.train = functools.partial(loop.train, on_step=lambda step: time.sleep(0.25))
from blip2cli.cli import main
sys.argv = ["blip2", *sys.argv[1:]]
main()
"""


def _cli_train(run_dir: Path, shards: list[str], *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW_CLI, "pretrain", "--stage", "1", "--recipe", "tiny_stage1",
           "--out", str(run_dir), "--device", "cpu", *FAST, f"train.max_steps={STEPS}", "train.save_every=0",
           f"data.shards={json.dumps(shards)}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_records(run_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {n} metrics records within {timeout}s")


def _same_run(a: Path, b: Path) -> None:
    """Equal losses for every step (one record each) and equal final weights."""
    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in ra], abs=1e-5)
    wa = load_file(a / step_dir_name(STEPS) / "trainable.safetensors")
    wb = load_file(b / step_dir_name(STEPS) / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_and_a_rerun_equals_the_uninterrupted_run(signum, shards, straight, tmp_path):
    """save_every=0 (as the demo sets): before, SIGTERM lost the whole run. Now it saves after the current
    step, says where, exits 128+signal, and the rerun continues exactly."""
    at = random.Random(int(signum)).randrange(2, STEPS - 1)
    run_dir = tmp_path / "run"
    proc = _cli_train(run_dir, shards)
    _wait_for_records(run_dir, proc, at)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    line = next(x for x in err.splitlines() if x.startswith("blip2: stopped:"))
    stopped = int(line.split("after step ")[1].split(":")[0])
    assert stopped >= at and f"saved {run_dir / step_dir_name(stopped)}" in line and "rerun the same command" in line
    assert (run_dir / "latest").read_text().strip() == step_dir_name(stopped)
    assert not (run_dir / "final").exists()
    train(_recipe(), run_dir, shards, device="cpu")  # the rerun: resume="auto"
    _same_run(straight, run_dir)


def test_a_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM asks for a save after the step; a second one (an impatient operator, or a
    scheduler's escalation) ends the process immediately with the signal's status."""
    code = ("import time; from blip2cli.training.run_control import StopSignals\n"
            "with StopSignals() as s:\n    print('ready', flush=True)\n"
            "    while True:\n        time.sleep(0.01)\n        if s.received: print('asked', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "asked"  # still running: the loop decides when to stop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "SIGTERM received: saving after this step" in err and "SIGTERM again: exiting at once" in err


def test_sigkill_after_unsaved_steps_leaves_one_record_per_step(shards, straight, tmp_path):
    """Steps logged after the last checkpoint are logged again by the resumed run: before, metrics.jsonl
    held both copies. Now the records after the resumed step are dropped first."""
    run_dir = tmp_path / "run"
    proc = _cli_train(run_dir, shards, "train.save_every=3")
    _wait_for_records(run_dir, proc, 5)  # steps 4-5 are past the step-3 checkpoint
    proc.kill()
    proc.communicate()
    assert len(_records(run_dir)) >= 5
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 1.')  # and a line torn by the kill
    train(_recipe("train.save_every=3"), run_dir, shards, device="cpu")
    _same_run(straight, run_dir)


def test_trim_records_keeps_through_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 3, 4)) + '{"step": 5')
    assert trim_records(path, 3) == 2  # step 4 and the torn line; step 3 twice (training and validation records)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 3]
    assert trim_records(path, 3) == 0 and trim_records(tmp_path / "absent.jsonl", 0) == 0


def test_rerun_of_a_finished_run_rewrites_nothing(straight, shards):
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file() and p.name != LOCK_FILENAME}
    result = train(_recipe(), straight, shards, device="cpu")
    assert result.steps == STEPS and result.final_checkpoint == straight / "final"
    after = {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file() and p.name != LOCK_FILENAME}
    assert after == before


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Another process holds the lock (flock is per open file: a child process, as a second `blip2 pretrain`).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from blip2cli.training.run_control "
         "import RunLock; lock = RunLock(Path(sys.argv[1])).__enter__(); print('held', flush=True); time.sleep(60)",
         str(run_dir)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=f"in use by pid {holder.pid} on "):
            train(_recipe(), run_dir, shards, device="cpu")
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "base").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing (SIGKILL): its record stays in the file, the kernel freed the lock.
    lines: list[str] = []
    with RunLock(run_dir, say=lines.append):
        owner = json.loads((run_dir / LOCK_FILENAME).read_text())
        assert owner["pid"] == os.getpid()
    assert len(lines) == 1 and f"stale lock of pid {holder.pid}" in lines[0]
    assert (run_dir / LOCK_FILENAME).read_text() == ""  # released cleanly: nothing stale next time
    with RunLock(run_dir, say=lines.append):
        pass
    assert len(lines) == 1


def test_changed_schedule_is_refused_on_resume_unless_allowed(shards, tmp_path):
    run_dir = tmp_path / "run"
    train(_recipe(), run_dir, shards, device="cpu", stop_after=2)
    with pytest.raises(CheckpointError, match=r"train.max_steps 8 -> 12.*--allow-schedule-change"):
        train(_recipe("train.max_steps=12"), run_dir, shards, device="cpu")
    with pytest.raises(CheckpointError, match=r"optim.lr 0.001 -> 0.002"):
        train(_recipe("optim.lr=2e-3"), run_dir, shards, device="cpu")
    result = train(_recipe("train.max_steps=4"), run_dir, shards, device="cpu", allow_schedule_change=True)
    assert result.steps == 4
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]


# ------------------------------------------------------------------- SIGKILL during checkpoint writes
class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 64)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def _write_forever(run_dir: str) -> None:
    """Save checkpoints as fast as possible: steps 1..7, then rewind to step 1 and save 2..7 over the old
    ones (the replace path), again and again; until killed."""
    torch.set_num_threads(1)
    model = _Small()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    run = Path(run_dir)
    for round_ in range(1_000_000):
        for step in range(1 if round_ == 0 else 2, 8):
            with torch.no_grad():
                model.body.weight.fill_(round_ * 10 + step)
            save_training_checkpoint(run, step, model, optimizer, None, {"round": round_}, keep_last=10)
        point_latest_at(run, step_dir_name(1))


def test_sigkill_at_random_instants_of_checkpoint_writes_never_breaks_resume(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for trial in range(20):
        run_dir = tmp_path / f"trial{trial}"
        child = ctx.Process(target=_write_forever, args=(str(run_dir),))
        child.start()
        time.sleep(0.05 + rng.random() * 0.3)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        found = find_checkpoint(run_dir)  # raised before when `latest` named a missing directory
        assert found is not None
        model = _Small()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        state = load_training_checkpoint(found, model, optimizer, None)
        step = int(found.name.removeprefix("step-"))
        assert state["step"] == step
        assert model.body.weight.flatten()[0].item() == state["round"] * 10 + step  # the files belong together
        # and the run goes on: the next save works and cleans up after the killed one
        save_training_checkpoint(run_dir, step + 1, model, optimizer, None, {"round": -1}, keep_last=10)
        assert find_checkpoint(run_dir).name == step_dir_name(step + 1)
        assert not list(run_dir.glob(".step-*"))


# ------------------------------------------------------------------- image bombs and truncated files
def _jpeg(size, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 80, 160)).save(buf, format="JPEG", quality=20)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile_shard(tmp_path_factory):
    """6 good samples, one 12000x12000 JPEG (a 270 KB file that decodes to 430 MB), two truncated JPEGs."""
    import webdataset as wds

    path = tmp_path_factory.mktemp("hostile") / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(6):
            sink.write({"__key__": f"good{i}", "jpg": _jpeg((40, 30), i), "txt": f"good picture {i}"})
        sink.write({"__key__": "bomb", "jpg": _jpeg((12000, 12000)), "txt": "a bomb"})
        whole = _jpeg((64, 48), 9)
        sink.write({"__key__": "cut1", "jpg": whole[: len(whole) // 2], "txt": "cut in half"})
        sink.write({"__key__": "cut2", "jpg": whole[:-2], "txt": "missing its end marker"})
    return path


def test_image_bomb_and_truncated_jpegs_are_skipped_and_counted(hostile_shard):
    from blip2cli.data.training import SkipCounter, make_eval_loader

    start = time.monotonic()
    batches = list(make_eval_loader(str(hostile_shard), batch_size=4, image_size=16))
    assert time.monotonic() - start < 5  # the bomb is never decoded
    counts = SkipCounter()
    for batch in batches:
        counts.update(batch["skipped"])
    assert [k for b in batches for k in b["key"]] == [f"good{i}" for i in range(6)]
    assert counts.counts == {"too_large": 1, "bad_image": 2}
    # the limit is configurable: with room for it, the bomb is an image like any other (header check only)
    from blip2cli.data.training import SampleDecoder

    sample = {"jpg": _jpeg((12000, 12000))}
    assert SampleDecoder(None, max_pixels=12000 * 12000).image(sample).size == (12000, 12000)
    assert SampleDecoder(None, max_pixels=12000 * 12000 - 1).image(sample) == "too_large"


def test_capfilt_and_ask_apply_the_same_guard(hostile_shard, tmp_path, monkeypatch):
    from blip2cli.data.capfilt import _decoded_samples
    from blip2cli.images import ImageTooLarge, load_image

    reasons = {key: image if isinstance(image, str) else "ok" for key, _, image in _decoded_samples(hostile_shard)}
    assert reasons == {**{f"good{i}": "ok" for i in range(6)}, "bomb": "too_large", "cut1": "corrupt",
                       "cut2": "corrupt"}
    big = tmp_path / "big.jpg"
    big.write_bytes(_jpeg((3000, 2000)))
    monkeypatch.setenv("BLIP2_MAX_IMAGE_PIXELS", "5000000")
    with pytest.raises(ImageTooLarge, match=r"big.jpg: 3000x2000 pixels is over the limit of 5,000,000"):
        load_image(big)
    monkeypatch.setenv("BLIP2_MAX_IMAGE_PIXELS", "6000000")
    assert load_image(big).size == (3000, 2000)


# ------------------------------------------------------------------- interrupted downloads
def test_download_reports_missing_shards_as_interrupted(tmp_path):
    import pandas as pd

    from blip2cli.data.download import (
        DownloadInterrupted,
        check_complete,
        expected_shards,
        summarize,
        validate_url_list,
    )

    lst = tmp_path / "list.csv"
    pd.DataFrame({"url": [f"http://x/{i}.jpg" for i in range(7)], "caption": ["c"] * 7}).to_csv(lst, index=False)
    urls = validate_url_list("custom", lst)
    assert expected_shards(urls, 3) == 3 and expected_shards(urls, 7) == 1
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 3, "status_dict": {"success": 3}}))
    with pytest.raises(DownloadInterrupted, match="1 of 3 shards finished") as err:
        check_complete(summarize(out), 3)
    assert err.value.exit_code == 130
    check_complete(summarize(out), 1)


def test_cli_exit_status_and_heading_of_a_stop(monkeypatch, capsys):
    from blip2cli import cli
    from blip2cli.training.run_control import TrainingStopped

    def stopped():
        raise TrainingStopped("SIGTERM after step 3: saved RUN/step-00000003; rerun the same command to continue",
                              signal.SIGTERM)

    monkeypatch.setattr(cli, "app", stopped)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 143
    assert capsys.readouterr().err.startswith("blip2: stopped: SIGTERM after step 3")


def test_blip2_error_default_exit_status():
    assert Blip2Error("x").exit_code == 1

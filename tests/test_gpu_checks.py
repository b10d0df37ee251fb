"""``benchmarks/gpu_checks.sh`` on tiny configs on the CPU: the script a GPU session runs cannot rot, fits its
time budget, and stops in one line on a Python that cannot run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"


def _run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "SIZE": "tiny", "OUT": str(tmp_path / "out"),
                   "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=240)


def test_time_limits_add_up_to_six_minutes_and_training_runs_first():
    text = SCRIPT.read_text()
    limits = [int(kill) + int(limit) for kill, limit in re.findall(r"timeout -k (\d+) (\d+) ", text)]
    assert len(limits) == 5  # environment + four parts, each limited
    assert sum(limits) <= 360
    parts = re.findall(r"^if want (\w+)", text, flags=re.M)
    assert parts == ["training", "tests", "identity", "generation"]
    assert "pytest tests/test_gpu.py -m gpu" in text  # only the GPU file is collected


def test_tiny_run_on_cpu_writes_every_part(tmp_path):
    result = _run(tmp_path, COMPILE="0", STEPS="2")  # compiled cases: tests/test_fast_paths.py
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "environment.txt").read_text().startswith("ok: torch ")
    for name, part in [("training.txt", "training"), ("tests-gpu.txt", "tests"), ("identity.txt", "identity"),
                       ("generation.txt", "generation")]:
        assert f"{part} exit 0" in (out / name).read_text()
    assert "tokens must be identical" in (out / "identity.txt").read_text()
    records = [json.loads(line) for line in (out / "training.jsonl").read_text().splitlines()]
    assert {(r["stage"], r["case"]) for r in records} == {
        (1, "live"), (1, "cache"), (1, "cache, ITG joint pass"), (2, "transformers live"), (2, "live"), (2, "cache")}
    for r in records:
        assert r["samples_per_s"] > 0 and r["flops_per_sample"] > 0 and "mfu" in r


def test_environment_failure_is_one_line_and_runs_nothing(tmp_path):
    fake = tmp_path / "site"
    (fake / "transformers").mkdir(parents=True)
    (fake / "transformers" / "__init__.py").write_text('__version__ = "4.40.0"\n')
    result = _run(tmp_path, PYTHONPATH=str(fake))
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        "environment check failed: FAIL: transformers 4.40.0 outside >=5.13,<5.25"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["environment.txt"]


@pytest.mark.parametrize("version, expected", [("2.14.1+cu130", (2, 14, 1)), ("5.24.0.dev0", (5, 24, 0)),
                                                ("8", (8,))])
def test_version_parsing(version, expected):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from check_env import _tuple
    finally:
        sys.path.pop(0)
    assert _tuple(version) == expected

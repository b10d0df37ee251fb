"""One line on whether this Python can run ``benchmarks/gpu_checks.sh``: exit 0 and the versions, or exit 1
and what is missing, before any time limit is spent on a part that would fail at import.

    python benchmarks/check_env.py            # needs CUDA
    python benchmarks/check_env.py --cpu      # the SIZE=tiny smoke run on a CPU

Only what the GPU checks import is required: torch, transformers, tokenizers, safetensors and pytest (the
project's other dependencies, such as open_clip or webdataset, are not imported by ``tests/test_gpu.py`` or
the benchmarks).
"""

from __future__ import annotations

import importlib
import sys

# (module, lowest version, first version not supported) as pyproject.toml states them
REQUIRED = [("torch", "2.6", "2.15"), ("transformers", "5.13", "5.25"), ("tokenizers", "0.21", None),
            ("safetensors", "0.4", None), ("pytest", "8", None)]


def _tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check(need_cuda: bool) -> tuple[bool, str]:
    found, problems = [], []
    for name, low, high in REQUIRED:
        try:
            version = importlib.import_module(name).__version__
        except ImportError as err:
            problems.append(f"{name} missing ({err})")
            continue
        found.append(f"{name} {version}")
        if _tuple(version) < _tuple(low) or (high and _tuple(version) >= _tuple(high)):
            problems.append(f"{name} {version} outside >={low}{f',<{high}' if high else ''}")
    if not problems:
        import torch

        if torch.cuda.is_available():
            found.append(f"cuda {torch.version.cuda} {torch.cuda.get_device_name()} "
                         f"bf16={torch.cuda.is_bf16_supported()}")
        elif need_cuda:
            problems.append("no CUDA device visible to torch")
    if problems:
        return False, "FAIL: " + "; ".join(problems)
    return True, "ok: " + ", ".join(found)


if __name__ == "__main__":
    ok, line = check(need_cuda="--cpu" not in sys.argv[1:])
    print(line)
    sys.exit(0 if ok else 1)

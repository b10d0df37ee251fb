#!/usr/bin/env bash
# The checks only a GPU can run, in one go, for a session that is lent one for a few minutes:
#
#     OUT=gpu-results bash benchmarks/gpu_checks.sh      # then read gpu-results/*.txt
#     SIZE=tiny bash benchmarks/gpu_checks.sh            # a smoke run of this script, on the CPU too
#
# 1. the GPU-marked tests (skipped elsewhere);
# 2. generation at real size (OPT-2.7B + ViT-g, random weights, bf16): blip2 vs transformers on the same
#    weights, greedy and beam 5, batch 1 and 32, tokens checked identical;
# 3. training steps/s and peak memory at real size: stage 1 (ViT-g, batch 105) and stage 2 (OPT-2.7B,
#    batch 16), stage 2 against a plain transformers forward/backward.
# Each part has its own time limit, so one that hangs does not cost the others. The model code and the
# benchmarks need only torch and transformers (>= 5.13); the tests also need the project's other
# dependencies (webdataset, open_clip_torch, ...), which a bare GPU machine may lack: part 1 then reports
# import errors and parts 2-3 still run.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
SIZE=${SIZE:-real}
{
    nvidia-smi
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT/environment.txt" 2>&1
timeout 120 "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider > "$OUT/tests-gpu.txt" 2>&1
timeout 240 "$PY" benchmarks/generation.py --size "$SIZE" --batches 1,32 --repeats 3 > "$OUT/generation.txt" 2>&1
echo "generation exit $?" >> "$OUT/generation.txt"
timeout 180 "$PY" benchmarks/training.py --size "$SIZE" --steps 5 > "$OUT/training.txt" 2>&1
echo "training exit $?" >> "$OUT/training.txt"
tail -n 20 "$OUT"/*.txt

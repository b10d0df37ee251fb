#!/usr/bin/env bash
# The checks only a GPU can run, in one go, for a session lent one for a few minutes:
#
#     OUT=gpu-results bash benchmarks/gpu_checks.sh      # then read gpu-results/*.txt
#     SIZE=tiny bash benchmarks/gpu_checks.sh            # the same script on tiny configs, on a CPU too
#                                                        # (tests/test_gpu_checks.py runs it in the default suite)
#
# 0. environment: versions and the device in one line; the script stops there if an import fails.
# 1. training (the most valuable figures, first): stage 1 and stage 2 samples/s, peak memory and MFU at
#    real size (ViT-g + BERT-base Q-Former, OPT-2.7B), eager vs compiled, live vs frozen-feature cache
#    (eager cases first: compiling at real size may take a minute per stage);
#    `benchmarks/training.py --size real`, the same command as on a CPU. Each case is one line in
#    training.txt / training.jsonl as soon as it is measured, so a cut run still returns figures.
# 2. the GPU-marked tests: tests/test_gpu.py only (collecting the whole suite would import optional
#    packages a bare GPU machine may lack).
# 3. generation identity: real widths with 2 blocks per part ("shallow"), fp32: blip2's tokens must be
#    transformers' token for token (in bf16 a different matmul shape may flip a last bit and then a beam).
# 4. generation timing at real size in bf16: tokens counted, not required; the training-step losses
#    within 2%.
# Each part has its own time limit: 30 + 180 + 40 + 40 + 70 = 360 s in the worst case (start-up apart).
# PARTS=training,tests,identity,generation chooses parts; STEPS timed steps per training case; COMPILE=0
# leaves out the compiled training cases (tests/test_gpu_checks.py, to stay within 30 s on a CPU).
set -u
OUT=${OUT:-gpu-results}
SIZE=${SIZE:-real}
PARTS=${PARTS:-training,tests,identity,generation}
STEPS=${STEPS:-5}
COMPILE=${COMPILE:-1}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# tiny: aot_eager checks the compiled cases' plumbing in seconds (inductor takes minutes on a CPU)
if [ "$SIZE" = tiny ]; then CPU_OK=--cpu; SHALLOW=tiny; REPEATS=1; BACKEND=aot_eager
else CPU_OK=; SHALLOW=shallow; REPEATS=3; BACKEND=inductor; fi
want() { case ",$PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# timeout -k: a part that ignores SIGTERM is killed 5 s later (counted in its limit below)
if ! timeout -k 5 25 "$PY" benchmarks/check_env.py $CPU_OK > "$OUT/environment.txt" 2>&1; then
    echo "environment check failed: $(tail -n 1 "$OUT/environment.txt")"
    exit 1
fi
cat "$OUT/environment.txt"
status=0
if want training; then
    NO_COMPILE=; [ "$COMPILE" = 0 ] && NO_COMPILE=--no-compile
    timeout -k 5 175 "$PY" benchmarks/training.py --size "$SIZE" --steps "$STEPS" --compile-backend "$BACKEND" $NO_COMPILE \
        --jsonl "$OUT/training.jsonl" > "$OUT/training.txt" 2>&1
    rc=$?; echo "training exit $rc" >> "$OUT/training.txt"; [ $rc -eq 0 ] || status=1
fi
if want tests; then
    timeout -k 5 35 "$PY" -m pytest tests/test_gpu.py -m gpu -rs -q -p no:cacheprovider > "$OUT/tests-gpu.txt" 2>&1
    rc=$?; echo "tests exit $rc" >> "$OUT/tests-gpu.txt"; [ $rc -eq 0 ] || status=1
fi
if want identity; then
    timeout -k 5 35 "$PY" benchmarks/generation.py --size "$SHALLOW" --dtype float32 --batches 1,4 --repeats 1 \
        > "$OUT/identity.txt" 2>&1
    rc=$?; echo "identity exit $rc" >> "$OUT/identity.txt"; [ $rc -eq 0 ] || status=1
fi
if want generation; then
    GEN_DTYPE=bfloat16; [ "$SIZE" = tiny ] && GEN_DTYPE=float32  # CPUs here have no fast bf16
    timeout -k 5 65 "$PY" benchmarks/generation.py --size "$SIZE" --dtype "$GEN_DTYPE" --batches 1,32 \
        --repeats "$REPEATS" > "$OUT/generation.txt" 2>&1
    rc=$?; echo "generation exit $rc" >> "$OUT/generation.txt"; [ $rc -eq 0 ] || status=1
fi
for f in "$OUT"/training.txt "$OUT"/tests-gpu.txt "$OUT"/identity.txt "$OUT"/generation.txt; do
    [ -f "$f" ] && { echo "== $f"; tail -n 15 "$f"; }
done
exit $status

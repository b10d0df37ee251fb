#!/usr/bin/env bash
# The BLIP-2 chain in miniature with real pretrained frozen parts, on a CPU, through the `blip2` CLI only:
#   build_assets.py -> download pretrain custom (captions) + vqa (QA) -> pretrain stage 1 (small_stage1)
#   -> pretrain stage 2 (small_stage2, from stage 1, captions + QA mixed) -> eval vqav2 / coco / flickr30k on the
#   held-out easy-VQA splits -> ask on a held-out image -> plot; prints the wall time of each stage and writes
#   WORK/results.json (every metric next to its baseline, the times, the settings).
#
# Usage (from the repository root, after the pip installs in benchmarks/real_parts/requirements*.txt):
#   benchmarks/real_parts/run_chain.sh [WORK]          # WORK defaults to /tmp/blip2_chain
# Environment knobs (defaults = the configuration measured in benchmarks/real_parts/README.md):
#   ASSETS=DIR    where build_assets.py writes (or has written) the parts and data (default WORK/assets)
#   S1_STEPS, S1_BATCH, S1_LR, S1_WARMUP, S2_STEPS, S2_BATCH, S2_LR, S2_WARMUP, S2_WEIGHTS ("[captions, qa]"),
#   IMAGE_SIZE, QUERIES, MAX_TXT_LEN, PRECISION (bf16 | fp32), K_TEST, EXTRA1 / EXTRA2 (more recipe overrides)
#   FORCE=1 reruns finished stages (by default a stage whose output exists is skipped and reported as such).
#
# The recipes stay one-GPU recipes: every CPU-sized setting is a command-line override below, printed by
# `blip2 pretrain` at start. Precision: bf16 runs fast on CPUs with AMX / AVX512-BF16 (measured here: 2x fp32);
# on other CPUs set PRECISION=fp32.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mkdir -p "${1:-${WORK:-/tmp/blip2_chain}}" && cd "${1:-${WORK:-/tmp/blip2_chain}}" && pwd)"
ASSETS="${ASSETS:-$WORK/assets}"
DATA="$ASSETS/data"

S1_STEPS="${S1_STEPS:-150}"
S1_BATCH="${S1_BATCH:-32}"
S1_LR="${S1_LR:-3e-4}"
S1_WARMUP="${S1_WARMUP:-15}"
S2_STEPS="${S2_STEPS:-250}"
S2_BATCH="${S2_BATCH:-32}"
S2_LR="${S2_LR:-2e-4}"
S2_WARMUP="${S2_WARMUP:-25}"
S2_WEIGHTS="${S2_WEIGHTS:-[1, 3]}"
IMAGE_SIZE="${IMAGE_SIZE:-84}"
QUERIES="${QUERIES:-16}"
MAX_TXT_LEN="${MAX_TXT_LEN:-24}"
PRECISION="${PRECISION:-bf16}"
K_TEST="${K_TEST:-16}"
EXTRA1="${EXTRA1:-}"
EXTRA2="${EXTRA2:-}"
FORCE="${FORCE:-0}"
export S1_STEPS S1_BATCH S1_LR S1_WARMUP S2_STEPS S2_BATCH S2_LR S2_WARMUP S2_WEIGHTS IMAGE_SIZE QUERIES MAX_TXT_LEN \
    PRECISION K_TEST EXTRA1 EXTRA2

# Two cores shared with other jobs: OpenMP threads that spin while waiting for a descheduled peer made every
# step ~7x slower here; passive waiting removes that (no cost on an idle machine).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false NO_ALBUMENTATIONS_UPDATE=1

TIMES="$WORK/times.tsv"
: > "$TIMES"
CHAIN_START=$(date +%s.%N)

stage() {  # stage NAME OUTPUT_MARKER -- command...: runs the command unless OUTPUT_MARKER exists, times it
    local name="$1" marker="$2"; shift 3
    local t0 t1 status="ran"
    t0=$(date +%s.%N)
    if [[ "$FORCE" != 1 && -n "$marker" && -e "$marker" ]]; then
        status="skipped (output exists)"
    else
        echo "=== $name: $*"
        "$@"
    fi
    t1=$(date +%s.%N)
    local secs; secs=$(python -c "print(f'{$t1 - $t0:.1f}')")
    printf '%s\t%s\t%s\n' "$name" "$secs" "$status" >> "$TIMES"
    echo "=== $name: ${secs} s ($status)"
}

cd "$WORK"
COMMON_PARTS=(model.vision="hf:$ASSETS/vision" model.qformer_init="$ASSETS/bert")
CPU=(model.vision_precision="$PRECISION" model.llm_precision="$PRECISION" train.precision="$PRECISION"
     data.num_workers=0 train.deterministic=false train.log_every=10 train.save_every=0)

# build_assets.py skips the parts it has already finished (0.1 s).
stage assets "" -- python "$ROOT/benchmarks/real_parts/build_assets.py" --out "$ASSETS"

stage shards_captions "$WORK/shards/captions/00003_stats.json" -- \
    blip2 download pretrain custom --url-list "$DATA/train_captions.csv" --out "$WORK/shards/captions" \
    --resize-mode no --shard-size 1000 --threads 4
stage shards_vqa "$WORK/shards/vqa/00003_stats.json" -- \
    blip2 download pretrain vqa --questions "$DATA/train_vqa_questions.json" \
    --annotations "$DATA/train_vqa_annotations.json" --images "$DATA/images/train" --out "$WORK/shards/vqa" \
    --resize-mode no --shard-size 10000 --threads 4

# shellcheck disable=SC2086
stage stage1 "$WORK/runs/stage1/final" -- \
    blip2 pretrain --stage 1 --recipe small_stage1 --out "$WORK/runs/stage1" --resume never "${COMMON_PARTS[@]}" "${CPU[@]}" \
    data.shards="[\"$WORK/shards/captions\"]" \
    model.image_size="$IMAGE_SIZE" model.num_query_tokens="$QUERIES" \
    data.global_batch_size="$S1_BATCH" data.micro_batch_size="$S1_BATCH" data.shuffle_buffer=1000 \
    data.rrc_scale="[1.0, 1.0]" data.max_txt_len="$MAX_TXT_LEN" \
    train.max_steps="$S1_STEPS" optim.lr="$S1_LR" optim.min_lr=1e-5 optim.warmup_steps="$S1_WARMUP" $EXTRA1

# shellcheck disable=SC2086
stage stage2 "$WORK/runs/stage2/final" -- \
    blip2 pretrain --stage 2 --recipe small_stage2 --init-from "$WORK/runs/stage1/final" --out "$WORK/runs/stage2" \
    --resume never model.llm="$ASSETS/llm" "${COMMON_PARTS[@]}" "${CPU[@]}" \
    data.shards="[\"$WORK/shards/captions\", \"$WORK/shards/vqa\"]" data.weights="$S2_WEIGHTS" \
    model.num_query_tokens="$QUERIES" \
    data.global_batch_size="$S2_BATCH" data.micro_batch_size="$S2_BATCH" data.shuffle_buffer=1000 \
    data.rrc_scale="[1.0, 1.0]" data.max_txt_len="$MAX_TXT_LEN" \
    train.max_steps="$S2_STEPS" optim.lr="$S2_LR" optim.min_lr=1e-5 optim.warmup_steps="$S2_WARMUP" $EXTRA2

EVAL=(--split test --workers 0 --no-java --device cpu)
# --length-penalty 0: the figures in the README were measured with it (the former OPT-style default); the paper's
# protocol, now the default, uses -1 with beam 5.
stage eval_vqav2 "$WORK/eval/vqav2/metrics.json" -- \
    blip2 eval vqav2 --model "$WORK/runs/stage2/final" --data "$DATA/eval/vqav2" --out "$WORK/eval/vqav2" "${EVAL[@]}" \
    --length-penalty 0
# easy-VQA captions are 3 words: the protocol's 8-token minimum would force filler, so 1-10 new tokens.
stage eval_coco "$WORK/eval/coco/metrics.json" -- \
    blip2 eval coco --model "$WORK/runs/stage2/final" --data "$DATA/eval/coco" --out "$WORK/eval/coco" "${EVAL[@]}" \
    --min-new-tokens 1 --max-new-tokens 10
# Retrieval uses the stage-1 model (ITC, then ITM re-ranks the top K_TEST; 100 images, so 16 of 100).
stage eval_flickr30k "$WORK/eval/flickr30k/metrics.json" -- \
    blip2 eval flickr30k --model "$WORK/runs/stage1/final" --data "$DATA/eval/flickr30k" --out "$WORK/eval/flickr30k" \
    "${EVAL[@]}" --k-test "$K_TEST"

# One held-out image: the first VQA question's, asked its own question, then captioned.
mapfile -t ASK < <(python - "$DATA/eval/vqav2" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
q = json.loads((d / "questions.json").read_text())["questions"][0]
a = {x["question_id"]: x for x in json.loads((d / "annotations.json").read_text())["annotations"]}[q["question_id"]]
print(d / "images" / f"{q['image_id']}.png", q["question"], a["multiple_choice_answer"], sep="\n")
EOF
)
ASK_IMAGE="${ASK[0]}" ASK_QUESTION="${ASK[1]}" ASK_TRUTH="${ASK[2]}"
ask() {
    echo "image: $ASK_IMAGE"; echo "question: $ASK_QUESTION (truth: $ASK_TRUTH)"
    echo -n "answer: "; blip2 ask "$ASK_IMAGE" "$ASK_QUESTION" --model "$WORK/runs/stage2/final" --device cpu | tee "$WORK/ask_answer.txt"
    echo -n "caption: "; blip2 ask "$ASK_IMAGE" --model "$WORK/runs/stage2/final" --device cpu --min-new-tokens 1 --max-new-tokens 10 | tee "$WORK/ask_caption.txt"
}
FORCE_SAVE="$FORCE"; FORCE=1
stage ask "" -- ask
stage plot "" -- blip2 plot "$WORK/runs/stage1" "$WORK/runs/stage2" --out "$WORK/plots"
FORCE="$FORCE_SAVE"

CHAIN_END=$(date +%s.%N)
python - "$WORK" "$DATA" "$CHAIN_START" "$CHAIN_END" "$ASK_IMAGE" "$ASK_QUESTION" "$ASK_TRUTH" <<'EOF'
import json, sys
from pathlib import Path
work, data, t0, t1, image, question, truth = sys.argv[1:]
work, data = Path(work), Path(data)
load = lambda p: json.loads(p.read_text()) if p.exists() else None
base = load(data / "baselines.json") or {}
vqa, coco, flickr = (load(work / "eval" / t / "metrics.json") or {} for t in ("vqav2", "coco", "flickr30k"))
bv, bc = base.get("vqav2", {}), base.get("coco", {})
majority = bv.get("majority_answer_accuracy", 32.0)
constant = bc.get("constant_caption_scores", {}).get("CIDEr", 68.46)
def losses(run):
    rows = [json.loads(l) for l in (work / "runs" / run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "loss" in r]
    return {"first": rows[0]["loss"], "min": min(r["loss"] for r in rows), "last": rows[-1]["loss"],
            "max_after_first_10pct": max(r["loss"] for r in rows[max(1, len(rows) // 10):]),
            "steps_logged": len(rows)} if rows else {}
times = {}
for line in (work / "times.tsv").read_text().splitlines():
    name, secs, status = line.split("\t")
    times[name] = {"seconds": float(secs), "status": status}
total = float(t1) - float(t0)
r1 = (flickr.get("txt_r1"), flickr.get("img_r1"))
results = {
    "vqav2": {"accuracy": vqa.get("accuracy"), "per_type": vqa.get("per_type"),
              "baselines": {"majority_answer (train 'yes')": majority,
                            "question_prior (blind)": bv.get("question_prior_accuracy"),
                            "held-out majority ('no')": bv.get("eval_majority_answer_accuracy")},
              "target": round(majority + (100 - majority) / 2, 1)},
    "coco_captions": {k: coco.get(k) for k in ("CIDEr", "BLEU-1", "BLEU-4", "ROUGE-L") if k in coco}
                     | {"baselines": {"constant caption CIDEr": constant}, "target CIDEr": round(2 * constant, 1)},
    "flickr30k_retrieval": {k: flickr.get(k) for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")}
                           | {"baselines": {"chance R@1": 1.0, "chance R@5": 5.0, "chance R@10": 10.0,
                                            "class ceiling R@1 (23 distinct captions)": 23.0},
                              "target R@1": 10.0},
    "ask": {"image": image, "question": question, "truth": truth,
            "answer": (work / "ask_answer.txt").read_text().strip() if (work / "ask_answer.txt").exists() else None,
            "caption": (work / "ask_caption.txt").read_text().strip() if (work / "ask_caption.txt").exists() else None},
    "loss": {"stage1": losses("stage1"), "stage2": losses("stage2")},
    "wall_seconds": {**{k: v["seconds"] for k, v in times.items()}, "total": round(total, 1)},
    "stage_status": {k: v["status"] for k, v in times.items()},
    "settings": {k: v for k, v in __import__("os").environ.items()
                 if k in ("S1_STEPS", "S1_BATCH", "S1_LR", "S1_WARMUP", "S2_STEPS", "S2_BATCH", "S2_LR", "S2_WARMUP",
                          "S2_WEIGHTS", "IMAGE_SIZE", "QUERIES", "MAX_TXT_LEN", "PRECISION", "K_TEST", "EXTRA1", "EXTRA2",
                          "OMP_WAIT_POLICY")},
    "recipes": {"stage1": str(work / "runs/stage1/recipe.toml"), "stage2": str(work / "runs/stage2/recipe.toml")},
    "plots": str(work / "plots"),
}
acc, cider = results["vqav2"]["accuracy"], results["coco_captions"].get("CIDEr")
results["targets_met"] = {
    "vqa >= halfway from majority to 100": acc is not None and acc >= results["vqav2"]["target"],
    "R@1 >= 10x chance (either direction)": any(x is not None and x >= 10 for x in r1),
    "CIDEr >= 2x constant caption": cider is not None and cider >= 2 * constant,
    "whole chain <= 60 min": total <= 3600,
}
(work / "results.json").write_text(json.dumps(results, indent=1))
print(f"VQA accuracy {acc} (majority {majority}, blind prior {bv.get('question_prior_accuracy')}, target {results['vqav2']['target']})")
print(f"caption CIDEr {cider} (constant caption {constant}, target {2 * constant:.1f})")
print(f"retrieval R@1 text {r1[0]} / image {r1[1]} (chance 1, target 10); R@5 {flickr.get('txt_r5')} / {flickr.get('img_r5')}")
print("wall seconds: " + ", ".join(f"{k} {v}" for k, v in results["wall_seconds"].items()))
print("targets met: " + json.dumps(results["targets_met"]))
print(f"results: {work / 'results.json'}")
EOF

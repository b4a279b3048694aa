#!/usr/bin/env bash
# Issue 14's CPU recipe study: which training recipe gets the CTC drafter the most held-out acceptance per training
# step. Distils a fixed set once on this CPU (round 0 of GSM8K train and of the styled requests; GPU rounds start
# at round 1, so they never repeat it), caches the base model's hidden states, trains every variant for the same
# steps on them, then scores all variants side by side on the set's held-out split (every 50th prompt, never
# trained on): acceptance per tree budget and the speedup this machine's cost curve predicts (ctcspec eval).
#   GSM8K_TRAIN=../shared/data/gsm8k/train.jsonl bash experiments/recipe_study.sh   # writes runs/study/
# Resumable: the distillation resumes, a variant cut short resumes from its checkpoint, a finished one is kept.
set -euo pipefail
OUT=${OUT:-runs/study}
GSM8K_TRAIN=${GSM8K_TRAIN:-../shared/data/gsm8k/train.jsonl}
SIZE=${SIZE:-700}                 # prompts per source: ~1400 answers, ~300 k answer tokens
STEPS=${STEPS:-600}
VARIANTS=${VARIANTS:-reference base-layer anchors128 n8k6 n4k3}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
ctcspec distill --threads "$THREADS" --prompts "$GSM8K_TRAIN" --styled --round 0 --round-size "$SIZE" \
    --batch-size 16 --out "$OUT/data" > "$OUT/distill.json"
common=(--threads "$THREADS" --data "$OUT/data" --steps "$STEPS" --batch-size 16 --eval-every 100000
        --final-eval-samples 64 --hidden-cache "$OUT/hidden-cache")
for variant in $VARIANTS; do
    case $variant in
        reference) args=() ;;                                       # the shipped recipe: N=6, K=4, 64 anchors
        base-layer) args=(--layer-init base) ;;                      # draft layer starts as the base's last layer
        anchors128) args=(--anchors-per-sequence 128) ;;
        n8k6) args=(--num-slots 8 --target-tokens 6) ;;
        n4k3) args=(--num-slots 4 --target-tokens 3) ;;
        *) echo "recipe_study: unknown variant $variant" >&2; exit 2 ;;
    esac
    resume=(); [ -f "$OUT/$variant/checkpoint.pt" ] && resume=(--resume)  # a variant cut short continues
    [ -f "$OUT/$variant/config.json" ] || ctcspec train "${args[@]}" "${common[@]}" "${resume[@]}" \
        --out "$OUT/$variant" > "$OUT/$variant.json" 2> "$OUT/$variant.log"
done
paths=(); for variant in $VARIANTS; do paths+=(--drafter-path "$OUT/$variant"); done
ctcspec eval --threads 1 --data "$OUT/data" "${paths[@]}" --transforms beam --budgets 1,2,4,8,16,32 --samples 64 \
    --anchors 48 --json "$OUT/eval.json" | tee "$OUT/eval.txt"

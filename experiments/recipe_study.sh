#!/usr/bin/env bash
# Issue 14's CPU recipe study: which training recipe gets the CTC drafter the most held-out acceptance per training
# step. Distils a fixed set once on this CPU (round 0 of GSM8K train and of the styled requests; GPU rounds start
# at round 1, so they never repeat it), caches the base model's hidden states, trains every variant for the same
# steps on them, then scores all variants side by side on the set's held-out split (every 50th prompt, never
# trained on): acceptance per tree budget and the speedup this machine's cost curve predicts (ctcspec eval).
#   GSM8K_TRAIN=../shared/data/gsm8k/train.jsonl DISTILL_S=2700 bash experiments/recipe_study.sh  # runs/study/
# Resumable: a distillation cut short resumes (one that ended, at its time limit or not, fixes the set), a variant
# cut short resumes from its checkpoint, a finished one is kept.
set -euo pipefail
OUT=${OUT:-runs/study}
GSM8K_TRAIN=${GSM8K_TRAIN:-../shared/data/gsm8k/train.jsonl}
SIZE=${SIZE:-700}                 # prompts per source: ~1400 answers, ~250 k answer tokens when all are answered
DISTILL_S=${DISTILL_S:-0}         # stop distilling after this long (0: answer them all); batches go in shuffled order
STEPS=${STEPS:-200}
BATCH=${BATCH:-8}                 # sequences per step, and drafts per sequence: a CPU-sized step (the GPU's is 32 x 64)
ANCHORS=${ANCHORS:-32}
VARIANTS=${VARIANTS:-reference base-layer more-anchors n8k6 n4k3 prefix soft two-layers}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
limit=(); [ "$DISTILL_S" = 0 ] || limit=(--time-limit-s "$DISTILL_S")
[ -s "$OUT/distill.json" ] || ctcspec distill --threads "$THREADS" --prompts "$GSM8K_TRAIN" --styled --round 0 \
    --round-size "$SIZE" --batch-size 48 "${limit[@]}" --out "$OUT/data" > "$OUT/distill.json"  # then the set is fixed
common=(--threads "$THREADS" --data "$OUT/data" --steps "$STEPS" --batch-size "$BATCH" --eval-every 100000
        --final-eval-samples 64 --hidden-cache "$OUT/hidden-cache")
for variant in $VARIANTS; do
    case $variant in
        reference) args=() ;;                                       # the shipped recipe: N=6, K=4, 1 layer, CTC only
        base-layer) args=(--layer-init base) ;;                      # draft layer starts as the base's last layer
        more-anchors) args=(--anchors-per-sequence $((2 * ANCHORS))) ;;
        n8k6) args=(--num-slots 8 --target-tokens 6) ;;
        n4k3) args=(--num-slots 4 --target-tokens 3) ;;
        prefix) args=(--prefix-weight 1) ;;                          # early tokens weigh more
        soft) args=(--soft-weight 1) ;;                              # KL to the base model's distributions
        two-layers) args=(--num-layers 2) ;;
        *) echo "recipe_study: unknown variant $variant" >&2; exit 2 ;;
    esac
    [ "$variant" = more-anchors ] || args+=(--anchors-per-sequence "$ANCHORS")
    resume=(); [ -f "$OUT/$variant/checkpoint.pt" ] && resume=(--resume)  # a variant cut short continues
    [ -f "$OUT/$variant/config.json" ] || ctcspec train "${args[@]}" "${common[@]}" "${resume[@]}" \
        --out "$OUT/$variant" > "$OUT/$variant.json" 2> "$OUT/$variant.log"
done
paths=(); for variant in $VARIANTS; do paths+=(--drafter-path "$OUT/$variant"); done
ctcspec eval --threads 1 --data "$OUT/data" "${paths[@]}" --transforms beam --budgets 1,2,4,8,16,32 --samples 64 \
    --anchors 256 --json "$OUT/eval.json" | tee "$OUT/eval.txt"

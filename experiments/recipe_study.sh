#!/usr/bin/env bash
# Issue 14's CPU recipe study: which training recipe gets the CTC drafter the most held-out acceptance per training
# step. Distils a fixed set once on this CPU (round 0 of GSM8K train and of the styled requests; GPU rounds start
# at round 1, so they never repeat it), caches the base model's hidden states, trains every variant for the same
# steps on them (but "shipped", the shipped drafter as it is), then scores all variants side by side on the set's
# held-out split (every 50th prompt, never trained on) and on its styled part alone: acceptance per tree budget and
# the speedup this machine's cost curve predicts (ctcspec eval).
#   GSM8K_TRAIN=../shared/data/gsm8k/train.jsonl DISTILL_S=2700 bash experiments/recipe_study.sh  # runs/study/
# Variants combine with '+' (VARIANTS="prefix n4k3+prefix prefix-2 shipped warm+prefix+lr-0.0003"); RUN puts
# them apart from the data, so a second study at other steps reuses the set and its cache:
#   RUN=runs/study/steps800 STEPS=800 VARIANTS="reference prefix" bash experiments/recipe_study.sh
# On the data store instead of a set of its own (issue 25's fused-feature study; scored on the held-out split of its
# chat sources, CHAT):
#   DATA=data/smollm2-135m-instruct RUN=runs/study25 VARIANTS="prefix+fused prefix" bash experiments/recipe_study.sh
# Resumable: a distillation cut short resumes (one that ended, at its time limit or not, fixes the set), a variant
# cut short resumes from its checkpoint, a finished one is kept.
set -euo pipefail
OUT=${OUT:-runs/study}            # the distilled set and its hidden-state cache
RUN=${RUN:-$OUT}                  # the variants and their scores (e.g. RUN=runs/study/steps800 STEPS=800)
GSM8K_TRAIN=${GSM8K_TRAIN:-../shared/data/gsm8k/train.jsonl}
SIZE=${SIZE:-700}                 # prompts per source: ~1400 answers, ~250 k answer tokens when all are answered
DISTILL_S=${DISTILL_S:-0}         # stop distilling after this long (0: answer them all); batches go in shuffled order
STEPS=${STEPS:-200}
BATCH=${BATCH:-8}                 # sequences per step, and drafts per sequence: a CPU-sized step (the GPU's is 32 x 64)
ANCHORS=${ANCHORS:-32}
VARIANTS=${VARIANTS:-reference base-layer more-anchors n8k6 n4k3 prefix soft two-layers}
DATA=${DATA:-}                    # a data store (or distilled directory) to train on instead of distilling a set
CHAT=${CHAT:-alpaca_eval/instructions.jsonl,styled}  # with DATA: the sources scored
ANCHORS_EVAL=${ANCHORS_EVAL:-256}   # draft positions per held-out sequence when scoring
THREADS=${THREADS:-2}
SHIPPED=${SHIPPED:-src/ctcspec/data/drafters/smollm2-135m-instruct-ctc}  # variant "shipped": scored, not trained
mkdir -p "$OUT"
limit=(); [ "$DISTILL_S" = 0 ] || limit=(--time-limit-s "$DISTILL_S")
[ -n "$DATA" ] || [ -s "$OUT/distill.json" ] || ctcspec distill --threads "$THREADS" --prompts "$GSM8K_TRAIN" --styled --round 0 \
    --round-size "$SIZE" --batch-size 48 "${limit[@]}" --out "$OUT/data" > "$OUT/distill.json"  # then the set is fixed
data=${DATA:-$OUT/data}
common=(--threads "$THREADS" --data "$data" --steps "$STEPS" --batch-size "$BATCH" --eval-every 100000
        --final-eval-samples 64 --hidden-cache "$OUT/hidden-cache")
variant_args() {  # a variant's training options; a variant is parts joined by '+', e.g. n4k3+prefix-2
    args=()
    local part
    for part in ${1//+/ }; do
        case $part in
            reference) ;;                                            # the shipped recipe: N=6, K=4, 1 layer, CTC only
            base-layer) args+=(--layer-init base) ;;                 # draft layer starts as the base's last layer
            more-anchors) args+=(--anchors-per-sequence $((2 * ANCHORS))) ;;
            n8k6) args+=(--num-slots 8 --target-tokens 6) ;;
            n4k3) args+=(--num-slots 4 --target-tokens 3) ;;
            prefix) args+=(--prefix-weight 1) ;;                     # early tokens weigh more
            prefix-*) args+=(--prefix-weight "${part#prefix-}") ;;   # ... with this weight
            soft) args+=(--soft-weight 1) ;;                         # KL to the base model's distributions
            two-layers) args+=(--num-layers 2) ;;
            fused) args+=(--feature-layers 2,15,27) ;;               # EAGLE-3's low / middle / high layers
            fused-*) args+=(--feature-layers "${part#fused-}") ;;    # ... these layers (fused-8,16)
            warm) args+=(--init-from "$SHIPPED") ;;                  # continue the shipped drafter, as a GPU round does
            lr-*) args+=(--lr "${part#lr-}") ;;                      # peak learning rate
            *) echo "recipe_study: unknown variant part $part (in $1)" >&2; exit 2 ;;
        esac
    done
    [[ +$1+ == *+more-anchors+* ]] || args+=(--anchors-per-sequence "$ANCHORS")
}
mkdir -p "$RUN"
drafter_dir() { if [ "$1" = shipped ]; then echo "$SHIPPED"; else echo "$RUN/$1"; fi; }
for variant in $VARIANTS; do
    [ "$variant" != shipped ] || continue
    variant_args "$variant"
    resume=(); [ -f "$RUN/$variant/checkpoint.pt" ] && resume=(--resume)  # a variant cut short continues
    [ -f "$RUN/$variant/config.json" ] || ctcspec train "${args[@]}" "${common[@]}" "${resume[@]}" \
        --out "$RUN/$variant" > "$RUN/$variant.json" 2> "$RUN/$variant.log"
done
paths=(); for variant in $VARIANTS; do paths+=(--drafter-path "$(drafter_dir "$variant")"); done
score() {  # score every variant on the held-out split of data dir $1 (of sources $3, when given), side by side
    local sources=(); [ -z "${3:-}" ] || sources=(--sources "$3")
    ctcspec eval --threads 1 --data "$1" "${paths[@]}" --transforms beam --budgets 1,2,4,8,16,32 --samples 64 \
        --anchors "$ANCHORS_EVAL" "${sources[@]}" --json "$RUN/eval$2.json" | tee "$RUN/eval$2.txt"
}
if [ -n "$DATA" ]; then score "$DATA" -chat "$CHAT"; exit 0; fi  # the store's chat part (held-out split: by prompt)
score "$data" ""
# The styled requests alone: the shipped drafter trained on most GSM8K train answers, never on these
if [ ! -s "$OUT/styled/samples.jsonl" ]; then  # written whole or not at all
    mkdir -p "$OUT/styled" && cp "$OUT/data/meta.json" "$OUT/styled/"
    python3 -c 'import json, sys
for line in sys.stdin:
    if json.loads(line).get("source") == "styled": sys.stdout.write(line)' \
        < "$OUT/data/samples.jsonl" > "$OUT/styled/samples.tmp"
    mv "$OUT/styled/samples.tmp" "$OUT/styled/samples.jsonl"
fi
score "$OUT/styled" -styled

#!/usr/bin/env bash
# Issue 25's equal-compute rule: the Medusa, Hydra and EAGLE-style drafters shipped until 2026-12-04 (taken from git,
# commit $BEFORE) continued with the data, steps and recipe of the CTC drafter's last stint (docs/ctc.md, "Third CPU
# stint"): the whole data store, 2 epochs (2,572 steps), 8 sequences x 32 anchors, lr 3e-4; then every drafter's
# held-out acceptance side by side, before and continued (with the shipped CTC drafter), on the store's held-out chat
# and GSM8K-train splits. Writes $OUT/before-<kind>/, $OUT/<kind>/ and $OUT/eval/; the continued ones are what ships.
# The store then held 4 shards (10,283 training answers); a grown store makes more steps per epoch.
#   bash scripts/continue_baselines.sh                # AMD EPYC kind: 17-22 min per training, ~6 min of evals; resumes
#   NO_EVAL=1 THREADS=1 KINDS=medusa bash scripts/continue_baselines.sh &   # two trainings at once, one thread each
#   NO_EVAL=1 THREADS=1 KINDS=hydra bash scripts/continue_baselines.sh; wait
# HIDDEN_CACHE (fp16 hidden states, ~3 GB) can be the CTC drafter's training cache; a cold one is filled first (over
# an hour on 2 cores): fill it with one job before starting two.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/baselines}
KINDS=${KINDS:-medusa hydra eagle}
THREADS=${THREADS:-2}
HIDDEN_CACHE=${HIDDEN_CACHE:-runs/hidden-cache}
BEFORE=${BEFORE:-0df3be0}
STORE=data/smollm2-135m-instruct
SHIPPED=src/ctcspec/data/drafters/smollm2-135m-instruct
for kind in medusa hydra eagle; do
  mkdir -p "$OUT/before-$kind"
  for f in config.json model.safetensors; do
    [ -f "$OUT/before-$kind/$f" ] && continue
    git show "$BEFORE:$SHIPPED-$kind/$f" > "$OUT/before-$kind/$f.$$" || { echo "no $SHIPPED-$kind/$f at $BEFORE" >&2; exit 2; }
    mv "$OUT/before-$kind/$f.$$" "$OUT/before-$kind/$f"
  done
done
for kind in $KINDS; do
  resume=(); [ -f "$OUT/$kind/checkpoint.pt" ] && resume=(--resume)
  ctcspec train --kind "$kind" --data "$STORE" --init-from "$OUT/before-$kind" "${resume[@]}" \
      --lr 3e-4 --epochs 2 --batch-size 8 --anchors-per-sequence 32 \
      --eval-every 643 --eval-samples 32 --final-eval-samples 64 \
      --hidden-cache "$HIDDEN_CACHE" --threads "$THREADS" --out "$OUT/$kind"
done
[ -n "${NO_EVAL:-}" ] && exit 0
mkdir -p "$OUT/eval"
drafters=(--drafter-path "$SHIPPED-ctc")
for kind in medusa hydra eagle; do
  drafters+=(--drafter-path "$OUT/before-$kind")
  [ -d "$OUT/$kind" ] && drafters+=(--drafter-path "$OUT/$kind")
done
common=(--data "$STORE" --anchors 16 --transforms beam --budgets 1,2,4,8,16,32 --samples 64 --threads "$THREADS" "${drafters[@]}")
ctcspec eval "${common[@]}" --sources alpaca_eval/instructions.jsonl,styled --json "$OUT/eval/eval-chat.json" | tee "$OUT/eval/eval-chat.txt"
ctcspec eval "${common[@]}" --sources gsm8k/train.jsonl --json "$OUT/eval/eval-gsm8k.json" | tee "$OUT/eval/eval-gsm8k.txt"

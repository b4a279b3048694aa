#!/usr/bin/env bash
# The GPU training recipe of the SmolLM2 CTC drafter and its training ablations (round 1 of docs/ctc.md;
# round 2, experiments/train_smollm2_gpu_round2.sh, added more chat data and trained the shipped drafter).
#   GSM8K_TRAIN=../shared/data/gsm8k/train.jsonl OUT=runs/gpu bash scripts/train_smollm2_gpu.sh
# Distillation: GSM8K train questions + the templated requests + SELF_INSTRUCT requests written by SmolLM2
# itself, answered greedily (256 new tokens). Training: a CTC drafter (N=8, K=6) for EPOCHS epochs, and
# one-epoch ablation variants side by side (N slots, K targets, causal slots, cross-entropy loss, full
# vocabulary). Writes to $OUT: ctc/ (the drafter), ablations.json (each variant's training summary and
# held-out acceptance curves: what docs/ablations/round*.json hold; `ctcspec eval --ablations DIR` prices
# them), ctc-ce-loss/ (the cross-entropy variant's weights), logs.txt and distilled.tar.gz (the data).
set -uo pipefail
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/ctcspec-gpu}
DEVICE=${DEVICE:-cuda}
SELF_INSTRUCT=${SELF_INSTRUCT:-3000}
LIMIT=${LIMIT:-}                  # e.g. LIMIT=8 for a quick CPU check of the pipeline
EPOCHS=${EPOCHS:-3}
ABLATION_EPOCHS=${ABLATION_EPOCHS:-1}
BATCH=${BATCH:-1024}              # generation batch
TRAIN_BATCH=${TRAIN_BATCH:-32}
DISTILL_LIMIT_S=${DISTILL_LIMIT_S:-240}
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-240}
mkdir -p "$OUT" "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
on_device() { python -m ctcspec "$@" --device "$DEVICE"; }
limit=(); [ -n "$LIMIT" ] && limit=(--limit "$LIMIT")

t0=$(date +%s)
python -c "from ctcspec.models import load_model; load_model('smollm2-135m-instruct')"  # export the GGUF once
timeout "$DISTILL_LIMIT_S" python -m ctcspec distill --device "$DEVICE" --prompts "$GSM8K_TRAIN" "${limit[@]}" \
  --max-new-tokens "${MAX_NEW:-256}" --batch-size "$BATCH" --out "$WORK/gsm8k" > "$WORK/distill_gsm8k.log" 2>&1 &
timeout "$DISTILL_LIMIT_S" python -m ctcspec distill --device "$DEVICE" --self-instruct "$SELF_INSTRUCT" --templated "${limit[@]}" \
  --max-new-tokens "${MAX_NEW:-256}" --batch-size "$BATCH" --out "$WORK/self" > "$WORK/distill_self.log" 2>&1 &
wait
t1=$(date +%s)
echo "distill: $((t1 - t0)) s; samples: $(cat "$WORK"/gsm8k/samples.jsonl | wc -l) gsm8k, $(cat "$WORK"/self/samples.jsonl | wc -l) self-instruct"

# round 1 used N=8 slots, K=6 targets, 32 anchors per sequence (the defaults then); variants override them
common=(--data "$WORK/gsm8k" "$WORK/self" --batch-size "$TRAIN_BATCH" --time-limit-s "$TRAIN_LIMIT_S"
        --num-slots 8 --target-tokens 6 --anchors-per-sequence 32)
on_device train --kind ctc "${common[@]}" --epochs "$EPOCHS" --out "$OUT/ctc" > "$WORK/train_default.log" 2>&1 &
abl() { name=$1; shift; on_device train --kind ctc "${common[@]}" --epochs "$ABLATION_EPOCHS" --out "$WORK/abl-$name" "$@" \
          > "$WORK/abl-$name.log" 2>&1; }
abl n8k6 &
abl n6k4 --num-slots 6 --target-tokens 4 &
abl n12k8 --num-slots 12 --target-tokens 8 &
abl causal --slot-attention causal &
abl ce --loss ce --target-tokens 8 &
abl fullvocab --draft-vocab 0 &
wait
t2=$(date +%s)
echo "train: $((t2 - t1)) s"

# Pack the results into $OUT: the ablations' summaries and curves, the logs, and the distilled data.
python - "$WORK" "$OUT/ablations.json" <<'PY'
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = {}
for path in sorted(work.glob("abl-*/config.json")):
    config = json.loads(path.read_text())
    rows[path.parent.name.removeprefix("abl-")] = {k: config[k] for k in ("draft", "training", "acceptance_curve")}
out.write_text(json.dumps(rows, indent=2) + "\n")
print(f"{len(rows)} ablation runs -> {out}")
PY
cp -r "$WORK/abl-ce" "$OUT/ctc-ce-loss" 2>/dev/null && rm -f "$OUT/ctc-ce-loss/checkpoint.pt"
for f in "$WORK"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v -E '^(train|distill|self-instruct):'; done \
  > "$OUT/logs.txt"
grep -h -E '"(steps|train_seconds|train_tokens)"' "$WORK"/abl-*.log "$WORK"/train_default.log
(cd "$WORK" && tar czf - gsm8k/samples.jsonl self/samples.jsonl self/self_instruct.jsonl gsm8k/meta.json) \
  > "$OUT/distilled.tar.gz"
rm -f "$OUT/ctc/checkpoint.pt"

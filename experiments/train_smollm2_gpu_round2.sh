#!/usr/bin/env bash
# Second GPU round for the shipped SmolLM2 drafter (after scripts/train_smollm2_gpu.sh, whose
# distilled data it reuses from $WORK/gsm8k and $WORK/self):
#   OUT=runs/gpu2 bash experiments/train_smollm2_gpu_round2.sh
# - distils the 6360 templated chat requests (more MT-bench-like data than round 1 had),
# - trains the default drafter (N=6 slots, K=4, the best round-1 ablation) on all data,
# - runs the two remaining one-epoch ablations on round-1 data (causal slots, cross-entropy loss).
set -uo pipefail
OUT=${OUT:-runs/gpu2}
WORK=${WORK:-/tmp/ctcspec-gpu}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-}
BATCH=${BATCH:-1024}
TRAIN_BATCH=${TRAIN_BATCH:-32}
EPOCHS=${EPOCHS:-2}
DISTILL_LIMIT_S=${DISTILL_LIMIT_S:-100}
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-170}
mkdir -p "$OUT" "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
limit=(); [ -n "$LIMIT" ] && limit=(--limit "$LIMIT")
on_device() { python -m ctcspec "$@" --device "$DEVICE"; }

t0=$(date +%s)
python -c "from ctcspec.models import load_model; load_model('smollm2-135m-instruct')"
timeout "$DISTILL_LIMIT_S" python -m ctcspec distill --device "$DEVICE" --templated "${limit[@]}" \
  --max-new-tokens "${MAX_NEW:-256}" --batch-size "$BATCH" --out "$WORK/templ2" > "$WORK/distill_templ2.log" 2>&1 &
distill=$!
abl() { name=$1; shift; on_device train --kind ctc --data "$WORK/gsm8k" "$WORK/self" --batch-size "$TRAIN_BATCH" --epochs 1 \
          --num-slots 8 --target-tokens 6 --anchors-per-sequence 32 --time-limit-s 240 --out "$WORK/abl-$name" "$@" \
          > "$WORK/abl-$name.log" 2>&1; }
abl causal --slot-attention causal &
abl ce --loss ce --target-tokens 8 &
wait $distill
t1=$(date +%s)
echo "distill: $((t1 - t0)) s; samples: $(wc -l < "$WORK/templ2/samples.jsonl") templated"
on_device train --kind ctc --data "$WORK/gsm8k" "$WORK/templ2" "$WORK/self" --batch-size "$TRAIN_BATCH" --epochs "$EPOCHS" \
  --num-slots 6 --target-tokens 4 --anchors-per-sequence 64 --time-limit-s "$TRAIN_LIMIT_S" --out "$OUT/ctc" \
  > "$WORK/train_default.log" 2>&1
wait
t2=$(date +%s)
echo "train: $((t2 - t1)) s"

# Pack the results into $OUT, as scripts/train_smollm2_gpu.sh does: the ablations (docs/ablations/round2.json),
# the cross-entropy variant's weights, the logs and the new distilled data.
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
(cd "$WORK" && tar czf - templ2/samples.jsonl templ2/meta.json) > "$OUT/distilled_templ2.tar.gz"
rm -f "$OUT/ctc/checkpoint.pt"

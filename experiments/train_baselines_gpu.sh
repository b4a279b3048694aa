#!/usr/bin/env bash
# The baselines with the shipped CTC drafter's full recipe, on a GPU (not yet run: no GPU was lent in
# the session that wrote it; the CPU script trains the shipped ones). Same data directories and order
# as the CTC drafter (scripts/train_smollm2_gpu.sh, experiments/train_smollm2_gpu_round2.sh), 2 epochs,
# batch 32, 64 anchors per sequence; three trainings side by side fit on one 80 GB GPU.
#   DATA="/tmp/ctcspec-gpu/gsm8k /tmp/ctcspec-gpu/templ2 /tmp/ctcspec-gpu/self" OUT=runs/gpu3 bash experiments/train_baselines_gpu.sh
set -uo pipefail
OUT=${OUT:-runs/gpu3}
DATA=${DATA:?set DATA to the distilled data directories}
DEVICE=${DEVICE:-cuda}
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-240}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
run() { kind=$1; shift; python -m ctcspec train --device "$DEVICE" --kind "$kind" --data $DATA --batch-size 32 \
          --epochs 2 --anchors-per-sequence 64 --time-limit-s "$TRAIN_LIMIT_S" --out "$OUT/$kind" "$@" \
          > "$OUT/$kind.log" 2>&1; }
run medusa &
run hydra --intermediate-size 512 &
run eagle &
wait
grep -h "train_seconds" "$OUT"/*.log

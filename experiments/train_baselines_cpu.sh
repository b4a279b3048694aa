#!/usr/bin/env bash
# Train the Medusa, Hydra and EAGLE-style baselines, and the CTC module with CTC loss and with
# cross-entropy (the loss ablation), for SmolLM2 on this CPU with the same budget each: a 1500-sequence
# subset of the distilled data the shipped CTC drafter was trained on (same draft vocabulary and
# held-out split: the full data lists are passed, in the same order), 3 epochs, batch 16. The base
# model's hidden states are computed once into a shared cache (fp16, ~0.5 GB), then each drafter
# trains on them. Parameter counts are kept comparable (4.7-5.7 M).
#   DATA="runs/gpu1/data/gsm8k runs/gpu2/data/templ2 runs/gpu1/data/self" OUT=runs/cpu bash experiments/train_baselines_cpu.sh
# (the data directories are what scripts/train_smollm2_gpu.sh and experiments/train_smollm2_gpu_round2.sh
# distil; see docs/ctc.md). Compare the results with
#   ctcspec eval --data $DATA --drafter-path runs/cpu/medusa --drafter-path runs/cpu/hydra ...
set -euo pipefail
OUT=${OUT:-runs/cpu}
DATA=${DATA:?set DATA to the distilled data directories (ctcspec distill outputs)}
RUNS=${RUNS:-medusa hydra eagle ctc ctc-ce}
COMMON=(--threads "${THREADS:-2}" --data $DATA --max-train-samples "${SAMPLES:-1500}" --batch-size 16
        --epochs "${EPOCHS:-3}" --eval-every 100000 --final-eval-samples 64 --hidden-cache "$OUT/hidden-cache")
mkdir -p "$OUT"
for run in $RUNS; do
  case $run in
    hydra) args=(--kind hydra --intermediate-size 512) ;;  # its token projections add 3.3 M parameters
    ctc-ce) args=(--kind ctc --loss ce) ;;                  # the loss ablation: slot i predicts token i
    *) args=(--kind "$run") ;;
  esac
  /usr/bin/time -f "$run: %e s" ctcspec train "${args[@]}" "${COMMON[@]}" --out "$OUT/$run" 2>&1 | tee "$OUT/$run.log"
done

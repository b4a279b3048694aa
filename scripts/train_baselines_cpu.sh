#!/usr/bin/env bash
# Train the Medusa, Hydra and EAGLE-style baselines (and a CTC drafter with the same budget) for
# SmolLM2 on this CPU, on a 1500-sequence subset of the distilled data the shipped CTC drafter was
# trained on (same draft vocabulary and held-out split). The base model's hidden states are computed
# once into a shared cache, then each drafter trains on them.
#   DATA="runs/gpu1/data/gsm8k runs/gpu2/data/templ2 runs/gpu1/data/self" OUT=runs/cpu bash scripts/train_baselines_cpu.sh
set -euo pipefail
OUT=${OUT:-runs/cpu}
DATA=${DATA:?set DATA to the distilled data directories (ctcspec distill outputs)}
KINDS=${KINDS:-medusa hydra eagle ctc}
COMMON=(--threads "${THREADS:-2}" --data $DATA --max-train-samples "${SAMPLES:-1500}" --batch-size 16
        --epochs "${EPOCHS:-3}" --eval-every 100000 --final-eval-samples 64 --hidden-cache "$OUT/hidden-cache")
mkdir -p "$OUT"
for kind in $KINDS; do
  /usr/bin/time -f "$kind: %e s" ctcspec train --kind "$kind" "${COMMON[@]}" --out "$OUT/$kind" \
    2>&1 | tee "$OUT/$kind.log"
done

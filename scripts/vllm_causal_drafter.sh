#!/usr/bin/env bash
# The causal CTC drafter shipped for vLLM (src/ctcspec/data/drafters/smollm2-135m-instruct-ctc-causal; docs/vllm.md):
# vLLM answers the AlpacaEval training instructions (distill --engine vllm), then the shipped bidirectional CTC
# drafter continues on them with causal slot attention (a warm start: its weights and draft vocabulary), on the CPU.
# Needs `make vllm` and ../shared/data (or DATA=...).
#   bash scripts/vllm_causal_drafter.sh     # runs/vllm_causal/{alpaca,drafter}; STEPS, THREADS, TIME_LIMIT_S to change
set -euo pipefail
OUT=${OUT:-runs/vllm_causal}
THREADS=${THREADS:-2}
SHIPPED=src/ctcspec/data/drafters/smollm2-135m-instruct-ctc
ctcspec distill --prompts "${DATA:-../shared/data}/alpaca_eval/instructions.jsonl" --engine vllm --batch-size 48 \
    --threads "$THREADS" --out "$OUT/alpaca"
ctcspec train --data "$OUT/alpaca" --init-from "$SHIPPED" --slot-attention causal --steps "${STEPS:-200}" \
    --batch-size 16 --lr 3e-4 --threads "$THREADS" --time-limit-s "${TIME_LIMIT_S:-3000}" \
    --hidden-cache "$OUT/hidden" --out "$OUT/drafter"

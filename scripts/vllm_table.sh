#!/usr/bin/env bash
# docs/vllm.md's single-request table: ctcspec's drafters (its default ctc+lookup among them) beside vLLM's plain
# greedy decoding, its n-gram speculation and ctcspec's causal CTC drafter inside vLLM (--peers vllm,vllm-ctc), one
# request at a time, on the same prompt ids, one thread each, float32, 256 new tokens: MT-bench (first question per
# category, both turns) and, with GSM8K=N, the first N GSM8K test questions. Needs `make vllm` and ../shared/data
# (or --data-dir / $CTCSPEC_DATA).
#   bash scripts/vllm_table.sh              # writes runs/vllm/mt_bench/
#   GSM8K=10 bash scripts/vllm_table.sh     # and runs/vllm/gsm8k/
set -euo pipefail
OUT=${OUT:-runs/vllm}
common=(--peers vllm,vllm-ctc --no-hf --threads 1 --max-new-tokens 256 --drafters "${DRAFTERS:-vanilla,lookup,ctc+lookup}")
rm -rf "$OUT/mt_bench" "$OUT/gsm8k"  # a fresh run replaces the last one
ctcspec bench --bench mt_bench --per-category "${PER_CATEGORY:-1}" "${common[@]}" --out "$OUT/mt_bench"
if [ "${GSM8K:-0}" -gt 0 ]; then
    ctcspec bench --bench gsm8k --limit "$GSM8K" "${common[@]}" --out "$OUT/gsm8k"
fi

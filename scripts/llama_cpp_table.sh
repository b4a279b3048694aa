#!/usr/bin/env bash
# The "Against llama.cpp" tables (README's headline, docs/results.md): ctcspec's drafters with the base model in llama.cpp (--backend llama.cpp,
# F32 GGUF of the same weights) beside llama.cpp's own plain greedy and prompt-lookup decoding (--peers), on the
# same prompt ids, one thread each, 256 new tokens: MT-bench (first question per category, both turns) and the
# first GSM8K test questions. Needs `make peers` (make test runs it) and ../shared/data (or --data-dir / $CTCSPEC_DATA).
#   bash scripts/llama_cpp_table.sh                # writes runs/llama_cpp/{mt_bench,gsm8k}/
#   PER_CATEGORY=3 GSM8K=50 bash scripts/llama_cpp_table.sh   # issue 13's full targets run (hours on 2 cores)
#   BACKEND=auto OUT=runs/torch_vs_llama_cpp bash scripts/llama_cpp_table.sh   # ctcspec's base model in torch instead
set -euo pipefail
OUT=${OUT:-runs/llama_cpp}
DRAFTERS=${DRAFTERS:-vanilla,lookup,ctc+lookup}
common=(--backend "${BACKEND:-llama.cpp}" --gguf "${GGUF:-f32}" --peers llama.cpp --no-hf --threads 1
        --max-new-tokens 256 --drafters "$DRAFTERS")
rm -rf "$OUT/mt_bench" "$OUT/gsm8k"  # a fresh run replaces the last one
ctcspec bench --bench mt_bench --per-category "${PER_CATEGORY:-1}" "${common[@]}" --out "$OUT/mt_bench"
ctcspec bench --bench gsm8k --limit "${GSM8K:-10}" "${common[@]}" --out "$OUT/gsm8k"

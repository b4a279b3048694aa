#!/usr/bin/env bash
# Batching's tables (docs/batching.md): `ctcspec bench --batch-size 8` on MT-bench (first turns, two questions per
# category: 16 prompts) and GSM8K (first 16), 256 tokens, one thread; then `ctcspec serve` one at a time against
# --max-batch 8 under 1 and 8 streaming clients (scripts/serve_load.sh, 60 s per level, 64 tokens per request; the
# prompts: MT-bench's one-line first turns, 61 of 80, read from $CTCSPEC_DATA or ../shared/data).
# Usage: OUT=runs/batch bash scripts/batch_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/batch}
drafters=${DRAFTERS:-vanilla,lookup,ctc,ctc+lookup}
.venv/bin/ctcspec bench --bench mt_bench --per-category 2 --batch-size 8 --max-new-tokens 256 --threads 1 \
    --drafters "$drafters" --out "$out/mt_bench"
.venv/bin/ctcspec bench --bench gsm8k --limit 16 --batch-size 8 --max-new-tokens 256 --threads 1 \
    --drafters "$drafters" --out "$out/gsm8k"
mkdir -p "$out/serve"
.venv/bin/python -c "import json, sys; [print(t) for t in (json.loads(l)['turns'][0] for l in open(sys.argv[1])) if '\n' not in t]" \
    "${CTCSPEC_DATA:-../shared/data}/mt_bench/question.jsonl" >"$out/serve/prompts.txt"
CONFIGS="ctc+lookup:1 vanilla:8 ctc+lookup:8" CLIENTS=1,8 PROMPTS="$out/serve/prompts.txt" OUT="$out/serve" \
    bash scripts/serve_load.sh 60 64

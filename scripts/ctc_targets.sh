#!/usr/bin/env bash
# Issue 25's targets for one CTC drafter, each benchmark one run with its drafters side by side: vanilla, lookup, ctc
# and ctc+lookup on MT-bench (first question per category, both turns) and GSM8K (first 10 test questions), 256 new
# tokens, greedy, --threads 1; then MT-bench again sampled at temperature 0.7 (seed 0). CTC=DIR scores that CTC
# drafter (default: the shipped one). Two drafters compared: two runs at the same time, one thread each (2 cores):
#   OUT=runs/targets/shipped bash scripts/ctc_targets.sh &
#   CTC=runs/ship/candidate OUT=runs/targets/candidate bash scripts/ctc_targets.sh; wait
# Needs ../shared/data (or $CTCSPEC_DATA). About 25 minutes per run on the AMD EPYC kind.
set -euo pipefail
OUT=${OUT:-runs/ctc_targets}
common=(--max-new-tokens 256 --threads 1 --no-hf --drafters vanilla,lookup,ctc,ctc+lookup)
[ -n "${CTC:-}" ] && common+=(--drafter-path "$CTC")
rm -rf "$OUT/mt_bench" "$OUT/gsm8k" "$OUT/mt_bench_t07"  # a fresh run replaces the last one
ctcspec bench --bench mt_bench --per-category 1 "${common[@]}" --out "$OUT/mt_bench"
ctcspec bench --bench gsm8k --limit 10 "${common[@]}" --out "$OUT/gsm8k"
ctcspec bench --bench mt_bench --per-category 1 "${common[@]}" --temperature 0.7 --seed 0 --out "$OUT/mt_bench_t07"

#!/usr/bin/env bash
# docs/sampling.md's table: every drafter and HF generate on MT-bench (first question per category, both
# turns), 128 new tokens, sampled at temperature 1.0 (seed 0), beside the same questions decoded greedily.
# The two runs go at the same time, one thread each (this machine has two cores), with the same trees: every
# trained drafter at tree budget 4 (the automatic choice times each drafter as it is built, which two runs
# starting together skew differently).
#   bash scripts/sampling_table.sh            # writes docs/results/{mt_bench_1pc_t1,mt_bench_1pc_greedy}/
set -euo pipefail
OUT=${OUT:-docs/results}
DRAFTERS=${DRAFTERS:-vanilla,lookup,medusa,hydra,eagle,ctc,ctc+lookup}
common=(--bench mt_bench --per-category 1 --max-new-tokens 128 --threads 1 --drafters "$DRAFTERS" --tree-budget 4)
mkdir -p "$OUT" "${LOGS:-runs}"
rm -rf "$OUT/mt_bench_1pc_t1" "$OUT/mt_bench_1pc_greedy"  # a fresh run replaces the committed one
ctcspec bench "${common[@]}" --temperature 1.0 --seed 0 --out "$OUT/mt_bench_1pc_t1" > "${LOGS:-runs}/mt_bench_1pc_t1.log" 2>&1 &
sampled=$!
ctcspec bench "${common[@]}" --out "$OUT/mt_bench_1pc_greedy" > "${LOGS:-runs}/mt_bench_1pc_greedy.log" 2>&1 &
greedy=$!
wait $sampled $greedy
cat "$OUT/mt_bench_1pc_t1/report.md" "$OUT/mt_bench_1pc_greedy/report.md"

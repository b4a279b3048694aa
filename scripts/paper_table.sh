#!/usr/bin/env bash
# docs/results.md's main tables: every drafter side by side on MT-bench (3 questions per category, both turns)
# and GSM8K (first 50 test questions), 256 new tokens, greedy; HF generate as a second reference on
# MT-bench (GSM8K skips it, GSM8K_HF=1 adds it: it makes that run ~15 minutes longer). The two
# benchmarks run at the same time, one thread each (this machine has two cores).
#   bash scripts/paper_table.sh            # writes docs/results/{mt_bench_3pc,gsm8k_50}/
set -euo pipefail
OUT=${OUT:-docs/results}
DRAFTERS=${DRAFTERS:-vanilla,lookup,medusa,hydra,eagle,ctc,ctc+lookup}
common=(--max-new-tokens 256 --threads 1 --drafters "$DRAFTERS")
mkdir -p "$OUT" "${LOGS:-runs}"
rm -rf "$OUT/mt_bench_3pc" "$OUT/gsm8k_50"  # a fresh run replaces the committed one (bench never mixes runs)
ctcspec bench --bench mt_bench --per-category 3 "${common[@]}" --out "$OUT/mt_bench_3pc" > "${LOGS:-runs}/mt_bench_3pc.log" 2>&1 &
mt=$!
gsm_hf=(--no-hf); [ -n "${GSM8K_HF:-}" ] && gsm_hf=()
ctcspec bench --bench gsm8k --limit 50 "${common[@]}" "${gsm_hf[@]}" --out "$OUT/gsm8k_50" > "${LOGS:-runs}/gsm8k_50.log" 2>&1 &
gsm=$!
wait $mt $gsm
cat "$OUT/mt_bench_3pc/report.md" "$OUT/gsm8k_50/report.md"

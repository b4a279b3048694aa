#!/usr/bin/env bash
# docs/vllm.md's distillation table: `ctcspec distill` on the same chat instructions with its default engine (HF
# generate, left-padded batches) and with vLLM (--engine vllm) at several batch sizes, one after the other on the
# same machine and threads, each from an empty directory; prints answer tokens/s, the ratio to HF, and whether the
# answers equal HF's and (the vLLM runs' --check-float32) HF greedy's one prompt at a time.
# Needs `make vllm` and ../shared/data (AlpacaEval instructions: training prompts).
#   bash scripts/vllm_distill.sh                             # 48 instructions, 256 tokens, 2 threads
#   LIMIT=192 VLLM_BATCHES="96 192" bash scripts/vllm_distill.sh   # batches of 96 and of 192 prompts
set -euo pipefail
PROMPTS=${PROMPTS:-../shared/data/alpaca_eval/instructions.jsonl}
OUT=${OUT:-runs/vllm_distill}
common=(--prompts "$PROMPTS" --limit "${LIMIT:-48}" --threads "${THREADS:-2}" --max-new-tokens "${MAX_NEW:-256}")
rm -rf "$OUT" && mkdir -p "$OUT"
ctcspec distill "${common[@]}" --batch-size "${HF_BATCH:-48}" --out "$OUT/hf" > "$OUT/hf.json"
for batch in ${VLLM_BATCHES:-48}; do
    ctcspec distill "${common[@]}" --engine vllm --batch-size "$batch" --check-float32 "${CHECK:-8}" \
        --out "$OUT/vllm_b$batch" > "$OUT/vllm_b$batch.json"
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def answers(run):
    return sorted((Path(out / run / "samples.jsonl")).read_text().splitlines())
hf = json.loads((out / "hf.json").read_text())
print(f"{'engine':<12} {'batch':>5} {'tokens':>7} {'tok/s':>7} {'vs hf':>6} {'same as hf':>10} {'float32 check':>14}")
print(f"{'hf':<12} {'':>5} {hf['answer_tokens']:>7} {hf['tokens_per_s']:>7} {'1.00x':>6}")
for path in sorted(out.glob("vllm_b*.json"), key=lambda p: int(p.stem[6:])):
    run = json.loads(path.read_text())
    same = sum(a == b for a, b in zip(answers(path.stem), answers("hf")))
    check = run["float32_check"]
    print(f"{'vllm':<12} {path.stem[6:]:>5} {run['answer_tokens']:>7} {run['tokens_per_s']:>7} "
          f"{run['tokens_per_s'] / hf['tokens_per_s']:>5.2f}x {same:>4}/{len(answers('hf')):<5} "
          f"{check['identical']:>8.0%} of {check['answers']}")
PY

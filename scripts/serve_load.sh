#!/usr/bin/env bash
# `ctcspec serve` on the embedded default (one thread) under concurrent streaming clients (scripts/load.py), one server
# configuration after another, each a drafter and a --max-batch: CONFIGS="drafter:max_batch ...". Every configuration
# after the first must give every prompt the answer the first gave (load.py --same-as; greedy, so lossless means equal).
# Writes OUT/<drafter>-b<max_batch>.{md,json}, each server's final /metrics and its log. PROMPTS=FILE: the load's
# prompts, one per line (default: load.py's, the four demo questions).
# Usage: scripts/serve_load.sh [DURATION_S] [MAX_TOKENS]   (default 60 s per level, 64 tokens per request)
#   The README's one-at-a-time table:  bash scripts/serve_load.sh
#   Its batching table:                CONFIGS="ctc+lookup:1 ctc+lookup:8 vanilla:8 lookup:8" CLIENTS=1,8 \
#                                      OUT=runs/serve_batch bash scripts/serve_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-60}
max_tokens=${2:-64}
configs=${CONFIGS:-"ctc+lookup:1 vanilla:1"}
clients=${CLIENTS:-1,4,16}
out=${OUT:-runs/serve_load}
port=8791
mkdir -p "$out"
first=""
status=0
for config in $configs; do
    drafter=${config%%:*}
    batch=${config##*:}
    name="$drafter-b$batch"
    .venv/bin/ctcspec serve --threads 1 --drafter "$drafter" --max-batch "$batch" --port "$port" \
        >"$out/server-$name.log" 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        kill -0 $server 2>/dev/null || { cat "$out/server-$name.log"; exit 1; }
        sleep 1
    done
    echo "## drafter: $drafter, --max-batch $batch"
    OMP_NUM_THREADS=1 .venv/bin/python scripts/load.py --base-url "http://127.0.0.1:$port/v1" --clients "$clients" \
        --duration "$duration" --max-tokens "$max_tokens" --json "$out/$name.json" \
        ${PROMPTS:+--prompts "$PROMPTS"} ${first:+--same-as "$first"} | tee "$out/$name.md" || status=1
    first=${first:-$out/$name.json}
    curl -sf "http://127.0.0.1:$port/metrics" >"$out/metrics-$name.txt"  # β: tokens_per_step _sum / _count
    kill -TERM $server
    wait $server || true
done
exit $status

#!/usr/bin/env bash
# The README's serving table (its Serve section): `ctcspec serve` on the embedded default (one thread) under 1, 4 and 16 concurrent
# streaming clients (scripts/load.py), once with the default drafter and once with plain decoding (vanilla),
# one server after the other. Writes runs/serve_load/<drafter>.{md,json}, each server's final /metrics and its log.
# Usage: scripts/serve_load.sh [DURATION_S] [MAX_TOKENS]   (default 60 s per level, 64 tokens per request)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-60}
max_tokens=${2:-64}
port=8791
out=runs/serve_load
mkdir -p "$out"
for drafter in ctc+lookup vanilla; do
    .venv/bin/ctcspec serve --threads 1 --drafter "$drafter" --port "$port" >"$out/server-$drafter.log" 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        kill -0 $server 2>/dev/null || { cat "$out/server-$drafter.log"; exit 1; }
        sleep 1
    done
    echo "## drafter: $drafter"
    OMP_NUM_THREADS=1 .venv/bin/python scripts/load.py --base-url "http://127.0.0.1:$port/v1" --clients 1,4,16 \
        --duration "$duration" --max-tokens "$max_tokens" --json "$out/$drafter.json" | tee "$out/$drafter.md"
    curl -sf "http://127.0.0.1:$port/metrics" >"$out/metrics-$drafter.txt"  # β: tokens_per_step _sum / _count
    kill -TERM $server
    wait $server || true
done

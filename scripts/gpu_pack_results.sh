#!/usr/bin/env bash
# Shared tail of the GPU training scripts: gather ablation results, logs and the distilled data into $OUT.
#   bash scripts/gpu_pack_results.sh WORK OUT ARCHIVE_NAME DATA_PATH...   (DATA_PATH relative to WORK)
set -uo pipefail
WORK=$1 OUT=$2 ARCHIVE=$3
shift 3
python scripts/collect_ablations.py "$WORK" "$OUT/ablations.json"
cp -r "$WORK/abl-ce" "$OUT/ctc-ce-loss" 2>/dev/null && rm -f "$OUT/ctc-ce-loss/checkpoint.pt"
for f in "$WORK"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v -E '^(train|distill|self-instruct):' ; done \
  > "$OUT/logs.txt"
grep -h -E '"(steps|train_seconds|train_tokens)"' "$WORK"/abl-*.log "$WORK"/train_default.log
(cd "$WORK" && tar czf - "$@") > "$OUT/$ARCHIVE"
rm -f "$OUT/ctc/checkpoint.pt"

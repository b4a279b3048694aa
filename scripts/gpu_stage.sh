#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for a GPU round on a device machine that sees only the working tree, at most
# 64 MiB per call, with no network: the embedded default's GGUF (98 MB) in parts that fit beside the tracked
# tree, and the one wheel the round needs there that the machine lacks (gguf, to read the GGUF). Prints the calls.
#   bash scripts/gpu_stage.sh
# Then, on the device, back to back while the machine stays warm: one call per part, carrying it, that copies it
# to /tmp/stage; then the round, carrying .gpu/whl (docs/ctc.md, "GPU rounds").
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=${LIMIT_MIB:-64}
MARGIN_MIB=${MARGIN_MIB:-4}
rm -rf .gpu && mkdir -p .gpu/whl
gguf=$(python -c "from ctcspec.models import embedded_gguf; print(embedded_gguf())")
version=$(python -c "import importlib.metadata as m; print(m.version('gguf'))")
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl "gguf==$version"
tree_bytes=$(git ls-files -z -co --exclude-standard | python -c "import os, sys
print(sum(os.path.getsize(p) for p in sys.stdin.read().split('\0') if p and os.path.isfile(p)))")
tree_mib=$(( (tree_bytes + (1 << 20) - 1) >> 20 ))  # tracked and untracked-not-ignored files travel every call
whl_mib=$(( ($(du -cb .gpu/whl | tail -1 | cut -f1) + (1 << 20) - 1) >> 20 ))
part_mib=$(( LIMIT_MIB - MARGIN_MIB - tree_mib - whl_mib ))
if [ "$part_mib" -lt 4 ]; then
    echo "the working tree takes ${tree_mib} MiB of the ${LIMIT_MIB} MiB a call carries: no room for the model" >&2
    exit 2
fi
split -b "${part_mib}M" -d -a 2 "$gguf" .gpu/part-
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/gguf.sha256
parts=(.gpu/part-*)
echo "working tree ${tree_mib} MiB; ${#parts[@]} parts of at most ${part_mib} MiB; gguf wheel ${whl_mib} MiB"
for part in "${parts[@]}"; do
    echo "device run: carry [\"$part\"]  command: mkdir -p /tmp/stage && cp $part /tmp/stage/"
done
echo "device run: carry [\".gpu/whl\", \".gpu/gguf.sha256\"]  command: python3 -m pip install -q --no-index" \
     "--no-deps --target /tmp/site .gpu/whl/*.whl && PYTHONPATH=/tmp/site GGUF_PARTS=/tmp/stage" \
     "GGUF_SHA256=\$(cat .gpu/gguf.sha256) bash scripts/gpu_round.sh \$OUT ROUND"

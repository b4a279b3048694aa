#!/usr/bin/env bash
# One GPU training round for the shipped CTC drafter (issue 14): one command inside ROUND_S seconds (a device call
# is cut at 600), every phase capped by what is left, so a short GPU loan is never lost to a phase that runs long:
#   bash scripts/gpu_round.sh OUT ROUND          # ROUND = 1, 2, ...: each takes prompts no other round takes
# 1. distil: the round's slice of the styled requests (chat- and code-leaning templates x topics x styles) and of
#    any PROMPT_FILES, plus SELF_INSTRUCT requests the base model writes (seeded with ROUND; they can repeat an
#    earlier round's), answered greedily in DTYPE with large batches; the first CHECK_FP32 answers are redone in
#    float32 to show what DTYPE does to the targets.
# 2. store: the answers join a copy of the data store (STORE, whose prompts distil skips) as one new shard.
# 3. train: the CTC drafter continues from INIT (--init-from: rounds accumulate) for STEPS steps on that store (all
#    the data so far); beside it, on the same data for the same steps, each of BASELINES (kind:init-dir) continues.
# 4. eval: INIT and the new drafter's held-out acceptance on the store's held-out split (prompts whose hash is
#    divisible by 50, never trained on), side by side.
# OUT gets at most 8 files: ctc/ (the new drafter: 2 files), round.json (each phase's end time and exit code,
# distil speed, float32 check, curves, verdict; rewritten after every phase, so a cut call still says how far it
# got), logs.txt, distilled.tar.xz (the round's distill directory: `ctcspec store DIR --into STORE` adds it to the
# repository's store, whatever that store gained meanwhile), one <kind>.tar per baseline.
# A new drafter replaces the shipped one only when round.json's "better" is true (docs/ctc.md, "GPU rounds").
# tests/test_training_rounds.py runs this file on the CPU with a tiny model and small limits (the dry run).
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_round.sh OUT ROUND}
ROUND=${2:?usage: bash scripts/gpu_round.sh OUT ROUND}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # the device machine has no ctcspec installed
PYTHON=${PYTHON:-python3}             # the device machine's python3 holds PyTorch
MODEL=${MODEL:-smollm2-135m-instruct}
GGUF_PARTS=${GGUF_PARTS:-}            # a folder of split GGUF parts (scripts/gpu_stage.sh): the model is rebuilt here
GGUF_SHA256=${GGUF_SHA256:-}          # and checked against this
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}              # distillation; training runs the base model in float32 (tf32 on a GPU)
SHIPPED=$ROOT/src/ctcspec/data/drafters/smollm2-135m-instruct
INIT=${INIT:-$SHIPPED-ctc}
BASELINES=${BASELINES-medusa:$SHIPPED-medusa hydra:$SHIPPED-hydra eagle:$SHIPPED-eagle}
PROMPT_FILES=${PROMPT_FILES:-}        # extra training prompt files (evaluation sets are refused)
STORE=${STORE-$ROOT/data/smollm2-135m-instruct}  # the data store (docs/ctc.md): its prompts are not answered again,
                                      # and training reads it with the round's data; empty: none (another MODEL)
ROUND_SIZE=${ROUND_SIZE:-12000}       # prompts per source per round: the 91,584 styled requests last 7 rounds
SELF_INSTRUCT=${SELF_INSTRUCT:-2048}
MAX_NEW=${MAX_NEW:-256}
BATCH=${BATCH:-1024}                  # generation batch
CHECK_FP32=${CHECK_FP32:-64}
STEPS=${STEPS:-800}
TRAIN_OPTS=${TRAIN_OPTS:---batch-size 32}   # architecture options must match INIT's (the defaults do)
LR=${LR:-3e-4}                        # a warm start's peak learning rate: at 1e-3 (a fresh start's) it forgot more than
                                      # it learned in the CPU study (docs/ctc.md, "Second study")
CTC_OPTS=${CTC_OPTS---prefix-weight 1}  # CTC loss terms only (the architecture must match INIT): the CPU recipe
                                      # study's winner (docs/ctc.md, "Recipe study")
ROUND_S=${ROUND_S:-540}               # the whole round
DISTILL_S=${DISTILL_S:-150}           # no generation batch starts later
TRAIN_S=${TRAIN_S:-150}               # no training step starts later
EVAL_S=${EVAL_S:-60}
PACK_S=60                             # kept for packing whatever the phases before it left
WORK=${WORK:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK/logs"
start=$(date +%s)
: > "$WORK/phases.txt"
failed=0

left() { echo $(( ROUND_S - PACK_S - ($(date +%s) - start) )); }  # seconds a phase may still take
cap() { local rest; rest=$(left); echo $(( $1 < rest ? $1 : (rest > 1 ? rest : 1) )); }
record() {  # round.json from what exists now
    "$PYTHON" - "$WORK" "$OUT" "$ROUND" <<'PY'
import json, sys
from pathlib import Path

work, out, round_index = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


phases = {name: {"end_s": int(end), "exit": int(code)}
          for name, end, code in (line.split() for line in (work / "phases.txt").read_text().splitlines())}
record = {"round": round_index, "phases": phases, "distill": read(work / "distill.json"),
          "train": read(out / "ctc" / "config.json").get("training"),
          "baselines": {p.parent.name: read(p).get("training") for p in sorted(work.glob("*/config.json"))
                        if p.parent.name not in ("data", "model")}}
data = out / "distilled.tar.xz"
if data.exists():
    record["distilled_bytes"] = data.stat().st_size  # a device call brings back files of at most 16 MiB
evaluated = read(work / "eval.json")
if len(evaluated.get("rows", [])) == 2:
    current, new = (row["acceptance"] for row in evaluated["rows"])
    record["heldout"] = {"current": current, "new": new}
    record["better"] = all(new[b] >= current[b] for b in current) and any(new[b] > current[b] for b in current)
(out / "round.json").write_text(json.dumps(record, indent=2) + "\n")
PY
}
phase() {  # name exit-code [required]: note the phase's end, rewrite round.json
    echo "$1 $(( $(date +%s) - start )) $2" >> "$WORK/phases.txt"
    echo "[$(( $(date +%s) - start )) s] $1: exit $2"
    if [ "$2" -ne 0 ] && [ "${3:-}" = required ]; then failed=1; fi
    record
}

if [ -n "$GGUF_PARTS" ]; then  # the embedded default travels as parts: rebuild the GGUF, export it once
    cat "$GGUF_PARTS"/part-* > "$WORK/model.gguf"
    if [ -n "$GGUF_SHA256" ] && [ "$(sha256sum < "$WORK/model.gguf" | cut -d' ' -f1)" != "$GGUF_SHA256" ]; then
        echo "gpu_round: the GGUF rebuilt from $GGUF_PARTS is not the one staged (sha256 differs)" >&2
        exit 2
    fi
    timeout "$(cap 180)" "$PYTHON" -c "import sys; from pathlib import Path; from ctcspec.models import export_gguf
export_gguf(Path(sys.argv[1]), Path(sys.argv[2]))" "$WORK/model.gguf" "$WORK/model" > "$WORK/logs/export.log" 2>&1
    phase export $? required
    MODEL=$WORK/model
fi

# the base model loads (on the CPU; quick) and is the one INIT was trained for, before any long phase
timeout "$(cap 120)" "$PYTHON" -c "import sys; from ctcspec.models import load_model
from ctcspec.modules.files import check_base, read_config
check_base(read_config(sys.argv[2])['base'], load_model(sys.argv[1]).model, sys.argv[2])" "$MODEL" "$INIT" \
    > "$WORK/logs/check.log" 2>&1
code=$?
phase check "$code" required
if [ "$code" -ne 0 ]; then
    echo "gpu_round: the model does not load, or INIT was trained for another base model ($WORK/logs/check.log)" >&2
    exit 2
fi

files=(); for f in $PROMPT_FILES; do files+=(--prompts "$f"); done
store=(); [ -z "$STORE" ] || store=(--store "$STORE")
timeout "$(cap $((DISTILL_S + 90)))" "$PYTHON" -m ctcspec distill --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --styled "${files[@]}" --round "$ROUND" --round-size "$ROUND_SIZE" --self-instruct "$SELF_INSTRUCT" \
    --max-new-tokens "$MAX_NEW" --batch-size "$BATCH" --time-limit-s "$DISTILL_S" --check-float32 "$CHECK_FP32" \
    "${store[@]}" --out "$WORK/data" > "$WORK/distill.json" 2> "$WORK/logs/distill.log"
phase distill $? required
mkdir -p "$WORK/store"
code=0
[ -z "$STORE" ] || cp -r "$STORE"/. "$WORK/store/" || code=1
[ "$code" -ne 0 ] || timeout "$(cap 60)" "$PYTHON" -m ctcspec store "$WORK/data" --into "$WORK/store" \
    --name "round$ROUND" --check-float32 0 > "$WORK/logs/store.json" 2> "$WORK/logs/store.log"  # distil checked fp32
code=$(( code ? code : $? ))
phase store "$code" required

train() {  # kind init-dir out-dir [options of this kind]
    # shellcheck disable=SC2086  # TRAIN_OPTS is a list of options
    timeout "$(cap $((TRAIN_S + 90)))" "$PYTHON" -m ctcspec train --model "$MODEL" --device "$DEVICE" --kind "$1" \
        --init-from "$2" --data "$WORK/store" --steps "$STEPS" --lr "$LR" --time-limit-s "$TRAIN_S" $TRAIN_OPTS \
        "${@:4}" --out "$3" > "$WORK/logs/train-$1.json" 2> "$WORK/logs/train-$1.log"
}
# shellcheck disable=SC2086  # CTC_OPTS is a list of options
train ctc "$INIT" "$OUT/ctc" $CTC_OPTS &
ctc=$!
others=()
for pair in $BASELINES; do train "${pair%%:*}" "${pair#*:}" "$WORK/${pair%%:*}" & others+=($!); done
wait "$ctc"
code=$?
for pid in "${others[@]}"; do wait "$pid" || echo "gpu_round: a baseline's training failed (logs.txt)" >&2; done
phase train "$code" required

timeout "$(cap "$EVAL_S")" "$PYTHON" -m ctcspec eval --model "$MODEL" --device "$DEVICE" --backend hf \
    --data "$WORK/store" --drafter-path "$INIT" --drafter-path "$OUT/ctc" --transforms beam --json "$WORK/eval.json" \
    > "$WORK/logs/eval.txt" 2>&1
phase eval $? required

rm -f "$OUT/ctc/checkpoint.pt"
for pair in $BASELINES; do
    kind=${pair%%:*}
    rm -f "$WORK/$kind/checkpoint.pt"
    if [ -f "$WORK/$kind/config.json" ]; then tar cf "$OUT/$kind.tar" -C "$WORK" "$kind"; fi
done
(cd "$WORK/data" && tar cf - ./*.jsonl ./*.json | xz -T0 -6) > "$OUT/distilled.tar.xz"  # for `ctcspec store`
for f in "$WORK"/logs/*; do echo "== ${f##*/}"; tr '\r' '\n' < "$f" | grep -v -E '^(train|distill|self-instruct): '; done \
    > "$OUT/logs.txt"
phase pack 0
"$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps({k: r.get(k) for k in
('round', 'phases', 'better', 'distilled_bytes')}))" "$OUT/round.json"
exit "$failed"

#!/usr/bin/env bash
# Reproduces the shipped SmolLM2 CTC drafter and the training ablations on one GPU.
#   GSM8K_TRAIN=../shared/data/gsm8k/train.jsonl OUT=runs/gpu bash scripts/train_smollm2_gpu.sh
# Distillation: GSM8K train questions + SELF_INSTRUCT requests written by SmolLM2 itself, answered
# greedily (256 new tokens). Training: the default drafter for EPOCHS epochs, and one-epoch ablation
# variants side by side (N slots, K targets, causal slots, cross-entropy loss, full vocabulary).
set -uo pipefail
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/ctcspec-gpu}
DEVICE=${DEVICE:-cuda}
SELF_INSTRUCT=${SELF_INSTRUCT:-3000}
LIMIT=${LIMIT:-}                  # e.g. LIMIT=8 for a quick CPU check of the pipeline
EPOCHS=${EPOCHS:-3}
ABLATION_EPOCHS=${ABLATION_EPOCHS:-1}
BATCH=${BATCH:-1024}              # generation batch
TRAIN_BATCH=${TRAIN_BATCH:-32}
DISTILL_LIMIT_S=${DISTILL_LIMIT_S:-240}
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-240}
mkdir -p "$OUT" "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
ctc() { python -m ctcspec "$@" --device "$DEVICE"; }
limit=(); [ -n "$LIMIT" ] && limit=(--limit "$LIMIT")

t0=$(date +%s)
python -c "from ctcspec.models import load_model; load_model('smollm2-135m-instruct')"  # export the GGUF once
timeout "$DISTILL_LIMIT_S" python -m ctcspec distill --device "$DEVICE" --prompts "$GSM8K_TRAIN" "${limit[@]}" \
  --max-new-tokens "${MAX_NEW:-256}" --batch-size "$BATCH" --out "$WORK/gsm8k" > "$WORK/distill_gsm8k.log" 2>&1 &
timeout "$DISTILL_LIMIT_S" python -m ctcspec distill --device "$DEVICE" --self-instruct "$SELF_INSTRUCT" --templated "${limit[@]}" \
  --max-new-tokens "${MAX_NEW:-256}" --batch-size "$BATCH" --out "$WORK/self" > "$WORK/distill_self.log" 2>&1 &
wait
t1=$(date +%s)
echo "distill: $((t1 - t0)) s; samples: $(cat "$WORK"/gsm8k/samples.jsonl | wc -l) gsm8k, $(cat "$WORK"/self/samples.jsonl | wc -l) self-instruct"

# round 1 used N=8 slots, K=6 targets, 32 anchors per sequence (the defaults then); variants override them
common=(--data "$WORK/gsm8k" "$WORK/self" --batch-size "$TRAIN_BATCH" --time-limit-s "$TRAIN_LIMIT_S"
        --num-slots 8 --target-tokens 6 --anchors-per-sequence 32)
ctc train "${common[@]}" --epochs "$EPOCHS" --out "$OUT/ctc" > "$WORK/train_default.log" 2>&1 &
abl() { name=$1; shift; ctc train "${common[@]}" --epochs "$ABLATION_EPOCHS" --out "$WORK/abl-$name" "$@" \
          > "$WORK/abl-$name.log" 2>&1; }
abl n8k6 &
abl n6k4 --num-slots 6 --target-tokens 4 &
abl n12k8 --num-slots 12 --target-tokens 8 &
abl causal --slot-attention causal &
abl ce --loss ce --target-tokens 8 &
abl fullvocab --draft-vocab 0 &
wait
t2=$(date +%s)
echo "train: $((t2 - t1)) s"
bash scripts/gpu_pack_results.sh "$WORK" "$OUT" distilled.tar.gz \
  gsm8k/samples.jsonl self/samples.jsonl self/self_instruct.jsonl gsm8k/meta.json

#!/usr/bin/env bash
# One GPU call: warm-started training of the retrieval model at 32K -> 64K -> 128K (the 1K and 16K stages
# pass at once and stay as replay: a quarter of the steps train at an earlier stage's length), then a
# dense accuracy check at 1K-128K. The defaults are the recipe of the shipped weights (200 s on an H200).
# Training resumes from any saved model: INIT (default: the shipped weights) is loaded with --init (the
# optimizer state is not saved; weights are written every 120 s, so a cut-off run leaves a checkpoint).
#   OUT=... [INIT=DIR] [BUDGET=s] [SEEDS="0 1"] bash train/gpu_long.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-200}
STAGES=${STAGES:-1024:16:16,16384:16:4,32768:16:2,65536:16:1,131072:16:1}
SHARES=${SHARES:-0.03,0.05,0.15,0.45}
LENGTHS=${LENGTHS:-1024,16384,32768,65536,131072}
INIT=${INIT:-mif_compile/data/retrieval-llama}
SEEDS=${SEEDS:-0}
mkdir -p "$OUT"
python -m pip install -e . --no-deps --no-build-isolation -q >/dev/null 2>&1 || echo "pip install -e . failed"
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
for s in $SEEDS; do
  python train/train_retrieval.py --out "$OUT/seed$s" --init "$INIT" --budget-s "$BUDGET" --stages "$STAGES" \
    --stage-share "$SHARES" --max-len 131072 --eval-lengths "$LENGTHS" --eval-every ${EVAL_EVERY:-50} \
    --eval-batches 2 --lr ${LR:-5e-4} --warmup 20 --seed $s --replay ${REPLAY:-0.25} ${EXTRA:-} > "$OUT/seed$s.log" 2>&1 &
done
wait
for s in $SEEDS; do echo "== seed $s"; grep -v Warning "$OUT/seed$s.log" | tail -12; done

#!/usr/bin/env bash
# One GPU call: extend the shipped retrieval model (trained to 16K) to 128K by warm-started training
# at 32K -> 64K -> 128K, two seeds side by side, then a dense accuracy check of each at 32K-256K.
#   OUT=... bash train/gpu_long.sh     (BUDGET: training seconds per seed, default 400)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-400}
STAGES=${STAGES:-2048:16:16,16384:16:4,32768:16:2,65536:16:1,131072:16:1}
SHARES=${SHARES:-0.04,0.05,0.15,0.3}
LENGTHS=${LENGTHS:-2048,16384,32768,65536,131072}
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

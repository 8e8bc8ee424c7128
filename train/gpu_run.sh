#!/usr/bin/env bash
# One GPU call: train three variants of the retrieval model side by side (they are launch-bound at
# short lengths, so they share one GPU well), keep the best, then evaluate it with the harness.
#   OUT=... bash train/gpu_run.sh            (BUDGET=training seconds per run, default 300)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
W=${WORK:-/tmp/retrieval_work}
BUDGET=${BUDGET:-300}
STAGES=${STAGES:-128:8:128,512:16:32,2048:16:16,8192:16:4,16384:16:2}
SHARES=${SHARES:-0.4,0.12,0.12,0.16}
LENGTHS=${LENGTHS:-2048,4096,8192,16384}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$W"
python -m pip install -e . --no-deps --no-build-isolation -q >/dev/null 2>&1 || echo "pip install -e . failed"
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
i=0
IFS=';' read -ra VARS <<< "${VARIANTS:-a --lr 2e-3;b --lr 1e-3;c --lr 3e-3}"
for v in "${VARS[@]}"; do
  set -- $v; name=$1; shift
  python train/train_retrieval.py --out "$W/$name" --budget-s "$BUDGET" --stages "$STAGES" --stage-share "$SHARES" \
    --max-len 16384 --eval-lengths "$LENGTHS" --seed $i "$@" $EXTRA > "$W/$name.log" 2>&1 &
  i=$((i + 1))
done
wait
for f in "$W"/*.log; do echo "== $f"; grep -v Warning "$f" | tail -8; done
python train/pick_best.py "$W" "$OUT" || exit 1
timeout ${EVAL_TIMEOUT:-200} python -m mif_compile.evaluate --model "$OUT/model" --lengths "$LENGTHS" \
  --samples ${SAMPLES:-2} --out "$OUT/eval" ${EVAL_EXTRA:-}
echo "eval rc $?"

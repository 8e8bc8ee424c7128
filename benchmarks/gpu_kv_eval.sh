#!/usr/bin/env bash
# Accuracy with KV-cache compression on one H200: mif-compile eval, the shipped model, the op's default
# settings, every run decode-scored (dense, ours, ours_kv1024, ours_kv4096). One 10-minute command per
# call; give other lengths or budgets as arguments:
#   bash benchmarks/gpu_kv_eval.sh                      # 65536
#   bash benchmarks/gpu_kv_eval.sh 131072 1024,4096
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
lengths=${1:-65536}; budgets=${2:-1024,4096}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout ${KV_EVAL_S:-570} python3 -m mif_compile.evaluate --model builtin --lengths "$lengths" --depths 6 --samples 2 \
  --ppl-samples 1 --baselines '' --adaptive off --fixed off --op-settings default --kv-budget "$budgets" --score decode \
  --out "$out/kv_eval_$lengths" 2>"$out/kv_eval_$lengths.err" | tee "$out/kv_eval_$lengths.log" | tail -40
tail -c 2000 "$out/kv_eval_$lengths.err"

#!/usr/bin/env bash
# Issue 14 on one H200: the cuda tests of KV-cache compression, then bench_snapkv (Llama-3-8B shape,
# structured attention). Each stage fits one 10-minute command; give the bench stage its lengths:
#   bash benchmarks/gpu_snapkv.sh tests
#   bash benchmarks/gpu_snapkv.sh bench --lengths 262144 524288 --budgets 4096
#   bash benchmarks/gpu_snapkv.sh bench --lengths 1048576 --budgets 1024 4096 --skip sparse --tag _1m
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
stage=${1:-tests}; shift || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
case $stage in
  tests)
    timeout 420 python3 -m pytest -q -p no:cacheprovider -m cuda tests/backend/test_cuda_snapkv.py \
      tests/backend/test_cuda_backend.py 2>&1 | tail -15 | tee "$out/snapkv_tests.log" ;;
  bench)
    timeout 570 python3 benchmarks/bench_snapkv.py --structured mixed "$@" --out "$out" 2>&1 | grep -v -i warn \
      | tee "$out/bench_snapkv.log" | tail -40 ;;
esac

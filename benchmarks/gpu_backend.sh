#!/usr/bin/env bash
# On the GPU machine: install, run every cuda-marked test, the quickstart and the prefill benchmark.
# Usage: bash benchmarks/gpu_backend.sh [tests] [quickstart] [prefill LAYERS TAG LENGTHS...]
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . --no-deps --no-build-isolation >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
while [ $# -gt 0 ]; do
  case "$1" in
    tests) shift
      timeout 300 python3 -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda_all.log" | tail -15 ;;
    quickstart) shift
      timeout 200 python3 examples/quickstart.py --seq-len 65536 2>&1 | tee "$OUT/quickstart_gpu.log" | tail -12 ;;
    prefill) layers=$2; tag=$3; shift 3; lens=()
      while [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; do lens+=("$1"); shift; done
      timeout 560 python3 benchmarks/bench_prefill.py --layers "$layers" --lengths "${lens[@]}" --repeats "${REPEATS:-1}" --plans ${PLANS:-vs ashape} ${COMPILED_DENSE:+--compiled-dense} \
        --out "$OUT" --tag "$tag" 2>&1 | tee "$OUT/bench_prefill$tag.log" | grep -v "^  sparse" | tail -20 ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
done

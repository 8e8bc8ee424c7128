#!/usr/bin/env bash
# Session 3 GPU run: cuda tests of the kernels and the adaptive index, then the adaptive-vs-fixed op benchmark.
# Usage (device machine): bash benchmarks/gpu_session3.sh [stage...]   stages: tests bench random
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
python3 -c "import mif_compile.kernels as K; print(K.__file__)" || exit 1
stages=${*:-tests bench random}
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$out/gpu.txt"
for st in $stages; do
  case $st in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_cuda.py tests/backend/test_cuda_adaptive.py 2>&1 | tail -25 | tee "$out/tests.log" ;;
    bench) timeout 400 python3 benchmarks/bench_adaptive.py --out "$out" 2>&1 | grep -v Warning | tee "$out/bench.log" ;;
    random) timeout 200 python3 benchmarks/bench_adaptive.py --lengths 131072,524288 --random --mass 0.95 2>&1 | grep -E "random|#" | tee "$out/bench_random.log" ;;
  esac
done

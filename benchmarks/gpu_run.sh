#!/usr/bin/env bash
# On the GPU machine: install the repo, run the CUDA-marked kernel tests and the attention benchmark.
# Writes at most 5 files directly under $OUT: env.txt, test_cuda.log, bench.log, bench_attention.json/.png.
# Usage: bash benchmarks/gpu_run.sh [extra args for bench_attention.py]
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
  python3 -c "import mif_compile.kernels as K; print('mif_compile.kernels from', K.__file__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 200 python3 -m pytest tests/kernels/test_cuda.py -q -p no:cacheprovider -x 2>&1 | tee "$OUT/test_cuda.log" | tail -15
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^  [a-z]" | tail -40

#!/usr/bin/env bash
# Session 3, structured benchmarks on the GPU: op level (all mixes, fixed vs mass targets) and random q/k.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
case ${1:-op} in
  op)
    timeout 420 python3 benchmarks/bench_structured.py --mixes mixed local slash vertical --mass 0.95 0.99 0.999 --out "$out" --tag structured 2>&1 | grep -v -i warn | tee "$out/op.log" | tail -40
    timeout 150 python3 benchmarks/bench_structured.py --mixes random --lengths 131072 524288 --mass 0.99 --out "$out" --tag random 2>&1 | grep -v -i warn | tee "$out/random.log" | tail -12 ;;
  model)
    shift; timeout 560 python3 benchmarks/bench_prefill.py --structured mixed "$@" --out "$out" 2>&1 | grep -v -i warn | tee "$out/model.log" | tail -30 ;;
esac
# final: cuda tests of the merged tree, then a speed check of the kernels against the previous run
if [ "${1:-}" = final ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_cuda.py tests/backend/test_cuda_adaptive.py tests/backend/test_cuda_backend.py 2>&1 | tail -15 | tee "$out/tests.log"
  timeout 200 python3 benchmarks/bench_structured.py --mixes mixed --lengths 131072 524288 --mass 0.99 --out "$out" --tag final 2>&1 | grep -v -i warn | tee "$out/final.log" | tail -8
fi

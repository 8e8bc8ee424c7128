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

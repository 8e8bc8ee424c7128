#!/usr/bin/env bash
# Session 6 on one H200, one stage per 10-minute call; everything lands in $OUT/<stage>.tgz (the device
# returns at most 8 files a call) plus the stage's log:
#   bash benchmarks/gpu_session6.sh op      # cuda tests of the index, bench_structured (new 8-position rule,
#                                           # fixed vs mass 0.95/0.98/0.99, 4 mixes, 128K-1M), random q/k
#   bash benchmarks/gpu_session6.sh model   # whole model, 32 layers, structured mixed, 128K + 256K
#   bash benchmarks/gpu_session6.sh kv      # bench_snapkv: 1M (dense estimated, sparse + kv_budget), 512K
# Not run yet (written after the session's device time was spent):
#   bash benchmarks/gpu_session6.sh speed   # the kernels after the 64-bit offsets and run-time caps, against
#                                           # the op-stage numbers: mixed, 128K + 1M, fixed + mass 0.98
#   bash benchmarks/gpu_session6.sh model512  # whole model, 32 layers, 512K, fixed + mass 0.98
# Each step has its own timeout so the stage ends, and tars what it has, inside the call's limit.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
stage=${1:-op}
out=${OUT:-/tmp/out}; d="$out/$stage"; mkdir -p "$d"
T0=$SECONDS
left() { echo $(( ${LIMIT:-570} - (SECONDS - T0) )); }
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$d/gpu.txt"
case $stage in
  op)
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m cuda tests/backend/test_cuda_adaptive.py 2>&1 \
      | tail -6 | tee "$d/tests.log"
    timeout $(( $(left) - 70 )) python3 benchmarks/bench_structured.py --mixes mixed local slash vertical \
      --mass 0.95 0.98 0.99 --out "$d" --tag _s6 2>&1 | grep -v -i warn | tee "$d/op.log" | tail -75
    timeout $(( $(left) - 5 )) python3 benchmarks/bench_structured.py --mixes random --lengths 131072 524288 \
      --mass 0.99 --out "$d" --tag _random_s6 2>&1 | grep -v -i warn | tee "$d/random.log" | tail -10 ;;
  model)
    timeout $(( $(left) - 5 )) python3 benchmarks/bench_prefill.py --structured mixed --layers 32 \
      --lengths 131072 262144 --plans vs --mass 0.99 0.95 --out "$d" --tag _s6 2>&1 | grep -v -i warn \
      | tee "$d/model.log" | tail -40 ;;
  kv)
    timeout 330 python3 benchmarks/bench_snapkv.py --structured mixed --lengths 1048576 --budgets 4096 \
      --skip sparse --decode-tokens 16 --out "$d" --tag _1m_s6 2>&1 | grep -v -i warn | tee "$d/kv_1m.log" | tail -30
    timeout $(( $(left) - 5 )) python3 benchmarks/bench_snapkv.py --structured mixed --lengths 524288 \
      --budgets 4096 --decode-tokens 16 --out "$d" --tag _512k_s6 2>&1 | grep -v -i warn \
      | tee "$d/kv_512k.log" | tail -30 ;;
  speed)
    timeout $(( $(left) - 5 )) python3 benchmarks/bench_structured.py --mixes mixed --lengths 131072 1048576 \
      --mass 0.98 --out "$d" --tag _speed 2>&1 | grep -v -i warn | tee "$d/speed.log" | tail -12 ;;
  model512)
    timeout $(( $(left) - 5 )) python3 benchmarks/bench_prefill.py --structured mixed --layers 32 \
      --lengths 524288 --plans vs --mass 0.98 --out "$d" --tag _512k 2>&1 | grep -v -i warn \
      | grep -v "^  run     layer" | tee "$d/model512.log" | tail -12 ;;
esac
echo "::: $stage done in $((SECONDS - T0)) s"
tar czf "$out/$stage.tgz" -C "$out" "$stage"

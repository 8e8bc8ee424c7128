#!/usr/bin/env bash
# Session 4, the one GPU call: (1) warm-started training of the retrieval model at 32K -> 64K -> 128K with
# replay of shorter lengths (train/gpu_long.sh), (2) its weights replace the shipped ones in this copy of the
# tree, (3) benchmarks/gpu_eval_long.sh: eval at 64K + 128K with the op's default settings, (4) the
# quickstart at 64K and the CUDA tests of the KV compression, as far as time is left. Everything under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$SECONDS
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
OUT="$OUT/train" BUDGET=${TRAIN_S:-240} STAGES=1024:16:16,16384:16:4,32768:16:2,65536:16:1,131072:16:1 \
  SHARES=0.03,0.05,0.15,0.45 LENGTHS=1024,16384,32768,65536,131072 REPLAY=0.25 bash train/gpu_long.sh
echo "::: training done at $((SECONDS - T0)) s"
if [ -f "$OUT/train/seed0/model.safetensors" ]; then
  cp "$OUT/train/seed0/"{model.safetensors,config.json,mif_eval.json} mif_compile/data/retrieval-llama/
fi
OUT="$OUT/eval13" QS_LENGTHS= LONG_LENGTHS= DEPTHS=${DEPTHS:-6} TOTAL_S=$((470 - (SECONDS - T0))) \
  bash benchmarks/gpu_eval_long.sh
left=$((575 - (SECONDS - T0)))
if [ $left -gt 50 ]; then
  timeout $left python examples/quickstart.py --seq-len 65536 > "$OUT/quickstart_64k.log" 2>&1
  grep -v -i warn "$OUT/quickstart_64k.log" | tail -25
fi
echo "::: eval done at $((SECONDS - T0)) s"
left=$((585 - (SECONDS - T0)))
if [ -f tests/backend/test_cuda_snapkv.py ] && [ $left -gt 40 ]; then
  timeout $left python -m pytest -q -p no:cacheprovider -m cuda tests/backend/test_cuda_snapkv.py 2>&1 | tail -8 | tee "$OUT/snapkv_tests.log"
fi
echo "::: all done at $((SECONDS - T0)) s"

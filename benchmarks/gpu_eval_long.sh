#!/usr/bin/env bash
# Issue 13 on one GPU, one call (<= 9 minutes on an H200): accuracy where sparsity really runs, and the
# quickstart's speedup. Everything goes to $OUT:
#   quickstart_64k.log, quickstart_128k.log   examples/quickstart.py at 65536 and 131072 tokens
#   eval/          mif-compile eval --model builtin at $LENGTHS (default 65536,131072), the op's default settings
#   eval_long/     the same at $LONG_LENGTHS (default 262144), only if enough of the time box is left
#   eval_all/      both merged: results.json, table.md (paste into the README), table.txt, needle.png
#   env.txt, steps.log (what ran, its exit code and seconds)
#
#   OUT=/tmp/out bash benchmarks/gpu_eval_long.sh
#   CPU smoke run (tiny lengths, forced sparse settings):
#   OUT=/tmp/smoke LENGTHS=1024 LONG_LENGTHS=2048 QS_LENGTHS=1024 OP_SETTINGS=forced DEPTHS=2 SAMPLES=1 \
#     MIN_LEFT_S=0 bash benchmarks/gpu_eval_long.sh
#
# Time estimate (H200; the model is 2 layers x 8 heads x head dim 32, so attention dominates). Causal
# attention per layer pass is 2 matmuls x N^2/2 pairs x d x 2 flop x H = 2 N^2 d H flop: 1.1 TFLOP at
# 32K, 4.4 at 64K, 17.6 at 128K, 70 at 256K per forward (2 layers). Flash attention at head dim 32
# runs well below the d=64 rate measured here (the old random-weight quickstart, 4 layers, d=64, 64K:
# 8.8 TFLOP in 48 ms = 183 TFLOP/s); taking 100 TFLOP/s, a dense forward takes about 0.05 s at 64K,
# 0.18 s at 128K, 0.7 s at 256K.
#   - install: ~20 s.
#   - quickstart: import + load ~15 s, Inductor compile ~30-60 s (cold cache), 1 + 5 runs each of
#     dense and minference (< 2 s at 128K): ~60 s each, timeout 150 s each.
#   - eval at 64K + 128K: per run and length 11 depths x 2 needles + 2 multi-key + 1 perplexity = 25
#     forwards; 5 runs (dense, ours, ours_fixed, a_shape, block_sparse). Forwards: dense 25 x 0.23 s
#     = 6 s, the sparse runs at most as long each (dense fallback) = 23 s; compiles: ours and
#     ours_fixed twice each (static, then dynamic), the matched baselines once per length, plus
#     one q/k capture per length for block-sparse = 10 compiles x ~8 s = 80 s; Triton JIT ~30 s; budget
#     bisection (A-shape ~34, block-sparse ~22 index builds per length) a few s. About 2.5 minutes;
#     timeout 300 s.
#   - eval at 256K: forwards 25 x 0.7 s = 18 s dense, <= 70 s sparse; 6 compiles ~50 s; ~2.5 minutes.
#     Run only when at least MIN_LEFT_S (170 s) of the TOTAL_S (520 s) box is left; its timeout is
#     what is left (so a slow 256K cannot eat the call; 64K and 128K are already written).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
LENGTHS=${LENGTHS:-65536,131072}
LONG_LENGTHS=${LONG_LENGTHS-262144}  # empty: no 256K step
QS_LENGTHS=${QS_LENGTHS-65536 131072}  # empty: no quickstart
OP_SETTINGS=${OP_SETTINGS:-default}
MODEL=${MODEL:-builtin}  # or a saved model folder (train/train_retrieval.py --out), e.g. a new checkpoint
EVAL_ARGS=${EVAL_ARGS:-}  # more eval options, e.g. "--pattern vertical_slash:100,800" or "--config plan.json"
QS_ARGS=${QS_ARGS:-}  # more quickstart options, e.g. "--mass 0.99"
MATCH=${MATCH:-ours}  # the run whose kept density the baselines match (ours_fixed or, with --adaptive, ours_adaptive)
DEPTHS=${DEPTHS:-11}
SAMPLES=${SAMPLES:-2}
PPL=${PPL:-1}
TOTAL_S=${TOTAL_S:-520}
MIN_LEFT_S=${MIN_LEFT_S:-170}
mkdir -p "$OUT"
START=$SECONDS

step() {  # step NAME TIMEOUT_S CMD...: runs it with a timeout, logs rc and seconds to steps.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "::: $name (timeout ${limit}s): $*" | tee -a "$OUT/steps.log"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "::: $name rc=$rc in $((SECONDS - t0)) s (total $((SECONDS - START)) s)" | tee -a "$OUT/steps.log"
    return $rc
}

step install 120 python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
"cuda", torch.cuda.is_available())'
  python -c 'import triton; print("triton", triton.__version__)' 2>/dev/null
  m=$MODEL; [ "$m" = builtin ] && m=mif_compile/data/retrieval-llama
  echo "model $MODEL"; sha256sum "$m/model.safetensors"; cat "$m/mif_eval.json"
  echo; git log --oneline -1 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for n in $QS_LENGTHS; do
  tag=$n; [ "$n" -ge 1024 ] && tag=$((n / 1024))k
  step "quickstart $n" 150 python examples/quickstart.py --seq-len "$n" $QS_ARGS > "$OUT/quickstart_$tag.log" 2>&1
  grep -v -i warn "$OUT/quickstart_$tag.log" | tail -12
done

eval_at() {  # eval_at DIR LENGTHS TIMEOUT
  local dir=$1 lengths=$2 limit=$3
  step "eval $lengths" "$limit" python -m mif_compile eval --model "$MODEL" --lengths "$lengths" \
    --op-settings "$OP_SETTINGS" --match-density "$MATCH" --depths "$DEPTHS" --samples "$SAMPLES" --ppl-samples "$PPL" --keys 16 \
    $EVAL_ARGS --out "$OUT/$dir" > "$OUT/$dir.log" 2> "$OUT/$dir.progress.log"
  local rc=$?
  grep -v -i warn "$OUT/$dir.log" | tail -40
  tail -c 600 "$OUT/$dir.progress.log" | tr '\r' '\n' | tail -3
  return $rc
}

left=$((TOTAL_S - (SECONDS - START)))
limit=$(( left < 300 ? left : 300 )); limit=$(( limit < 60 ? 60 : limit ))
eval_at eval "$LENGTHS" "$limit"
parts=("$OUT/eval/results.json")
left=$((TOTAL_S - (SECONDS - START)))
if [ -n "$LONG_LENGTHS" ] && [ "$left" -ge "$MIN_LEFT_S" ]; then
  eval_at eval_long "$LONG_LENGTHS" "$left" && parts+=("$OUT/eval_long/results.json")
elif [ -n "$LONG_LENGTHS" ]; then
  echo "::: eval $LONG_LENGTHS skipped: ${left}s left of ${TOTAL_S}s (needs ${MIN_LEFT_S}s)" | tee -a "$OUT/steps.log"
fi
if [ -f "$OUT/eval/results.json" ]; then
  step merge 60 python benchmarks/eval_merge.py "$OUT/eval_all" "${parts[@]}"
  cat "$OUT/eval_all/table.md"
fi
echo "::: done in $((SECONDS - START)) s"

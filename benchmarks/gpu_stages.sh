#!/usr/bin/env bash
# GPU stages on one H200, one stage per 10-minute device call; everything lands in $OUT/<stage>.tgz (the
# device returns at most 8 files a call) plus the stage's log. (Session 6 ran op, model and kv of this
# script, then named gpu_session6.sh, with MASSES="0.95 0.98 0.99" and TAG=_s6.)
#   bash benchmarks/gpu_stages.sh tests     # every cuda-marked test alone
#   bash benchmarks/gpu_stages.sh op        # cuda tests of the index, bench_structured (fixed vs each of
#                                           # $MASSES, 4 mixes, 128K-1M)
#   bash benchmarks/gpu_stages.sh mixed     # the whole op on `mixed`, 128K-1M, fixed / $OP_MASSES, no tests (~4 min)
#   bash benchmarks/gpu_stages.sh profile   # the index stage by stage (estimate, fixed, select, choice, build)
#                                           # and kernel by kernel, fixed / 1.0 / 0.99, eager and with
#                                           # ops.compile_index() (+ic), 128K 256K 1M (~2 min)
# MIF_COMPILE_INDEX=1 in front of any stage runs the op's vertical-slash choice through torch.compile.
# KERNEL="--pair --fold --tma" (the flags named on, the others off) in front of op, model, model512 or prof runs it with
# the kernel's module defaults set so (benchmarks/with_kernel.py); TILES_ARGS adds bench_tiles arguments
# (e.g. "--block-m 128 64 --variants single/0/0 pair+fold+tma/0/0").
#   bash benchmarks/gpu_stages.sh blockm    # block_m 64 vs 128 (index and kernel), mixed, 128K + 256K, fixed,
#                                           # 1.0, 0.99: CPU says 15% fewer pairs at 64 (~3 min)
#   bash benchmarks/gpu_stages.sh check     # the index's cuda tests (full log), the op on mixed at $CHECK_LENGTHS (128K +
#                                           # 256K); CHECK_IC=1: profile_index --index-compile at 128K (session 14's first
#                                           # call ran these tests with profile, mixed and random as a stage 'index')
#   bash benchmarks/gpu_stages.sh verify    # session 16's unrun second call (~9 min): the twin test of the selection
#                                           # kernels (fp fusion off) with its full log, every cuda test, random q/k
#                                           # at 128K + 512K (1.0, 0.97), the op on mixed with 0.98 / 0.995 at 128K-1M
#   bash benchmarks/gpu_stages.sh random    # random q/k at 128K + 512K, each of $MASSES (never slower)
#   bash benchmarks/gpu_stages.sh model     # whole model, 32 layers, structured mixed, 128K + 256K, dense,
#                                           # fixed ("vs") and $MODEL_MASSES (1.0: the default options)
#   bash benchmarks/gpu_stages.sh model512  # the same at 512K
#   bash benchmarks/gpu_stages.sh kv        # bench_snapkv at 1M alone (dense estimated, sparse + kv_budget):
#                                           # session 7's 330 s step did not finish it (157 s compile)
#   bash benchmarks/gpu_stages.sh kv512     # bench_snapkv at 256K + 512K (dense, sparse, sparse + kv_budget),
#                                           # eager like kv (--no-inductor); KV_ARGS replaces it in both
#                                           # (e.g. "--no-inductor --mass 0.99 --skip sparse dense")
#   bash benchmarks/gpu_stages.sh kvall     # bench_snapkv at 256K, 512K and 1M in one run (dense from one layer x 32,
#                                           # sparse with the full cache where it fits, sparse + kv_budget=4096)
#   bash benchmarks/gpu_stages.sh prof      # profile_model: a 2-layer structured model at $PROF_LENGTHS, dense eager
#                                           # (cuDNN pinned / PyTorch's choice) vs ours, kernel by kernel, and SDPA
#                                           # alone on contiguous vs transformers' transposed layout (~3 min)
#   bash benchmarks/gpu_stages.sh tiles     # the kernel's launch options: their cuda tests, then bench_tiles (the default
#                                           # launch vs band_tma / cols / the kernel before session 12) on the op's
#                                           # index, 128K + 256K (~3 min); benchmarks/kernel_resources.py screens
#                                           # variants on CPU first (registers, spills, shared memory)
#   bash benchmarks/gpu_stages.sh train     # issue 13: train the shipped retrieval model on, mostly at 128K
#                                           # ($TRAIN_S s, seed $TRAIN_SEED; dense accuracy 16K-128K at the end),
#                                           # weights in $OUT/train/seed*/; EVAL_AFTER=1 then evaluates them
#   bash benchmarks/gpu_stages.sh eval      # mif-compile eval on the shipped model, 64K + 128K, op defaults:
#                                           # ours (mass 1.0), ours_fixed, baselines (+ $EVAL_ARGS)
# Each step has its own timeout so the stage ends, and tars what it has, inside the call's limit.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
stage=${1:-op}
MASSES=${MASSES:-0.98 0.99 1.0}
MODEL_MASSES=${MODEL_MASSES:-1.0}  # one mass: two did not fit a call in session 6 (session 7: 0.99)
MODEL_BLOCK_M=${MODEL_BLOCK_M:-128}  # "128 64": each mass row at both query blocks (one more row: may not fit)
EVAL_ARGS=${EVAL_ARGS:-}  # e.g. "--adaptive 0.99" (session 7: ours was fixed, ours_adaptive 1.0)
TAG=${TAG:-_s16}
BLOCKM_LENGTHS=${BLOCKM_LENGTHS:-131072 262144}
PROFILE_LENGTHS=${PROFILE_LENGTHS:-131072 262144 1048576}
TRAIN_S=${TRAIN_S:-480}
PROF_LENGTHS=${PROF_LENGTHS:-131072}
TRAIN_SEED=${TRAIN_SEED:-0}
KERNEL=${KERNEL:-}  # e.g. "--pair": op, model, model512 and prof run through benchmarks/with_kernel.py
out=${OUT:-/tmp/out}; d="$out/$stage"; mkdir -p "$d"
T0=$SECONDS
left() { echo $(( ${LIMIT:-570} - (SECONDS - T0) )); }
PYK=python3; [ -n "$KERNEL" ] && PYK="python3 benchmarks/with_kernel.py $KERNEL --"  # (timeout runs no functions)
# the whole op on `mixed` (fixed, mass 1.0 = the default, and $OP_MASSES' others): lengths, tag, log name, more flags.
# 0.97: on the CPU at 512K it keeps 0.0126 of the pairs against 1.0's 0.0342, at error 0.016 (fixed: 0.037), session 15
OP_MASSES=${OP_MASSES:-1.0 0.99 0.97}
mixed_op() {
  local lengths=$1 tag=$2 log=$3; shift 3
  timeout $(( $(left) - 5 )) python3 benchmarks/bench_structured.py --mixes mixed --lengths $lengths --mass $OP_MASSES "$@" \
    --out "$d" --tag "$tag$TAG" 2>&1 | grep -v -i warn | tee "$d/$log" | tail -12
}
# bench_snapkv on structured mixed, kv_budget 4096, eager graphs unless KV_ARGS: lengths, tag (also the log's), more flags
snapkv() {
  local lengths=$1 tag=$2; shift 2
  timeout $(( $(left) - 5 )) python3 benchmarks/bench_snapkv.py --structured mixed --lengths $lengths --budgets 4096 \
    --decode-tokens 16 "$@" ${KV_ARGS:---no-inductor} --out "$d" --tag "$tag$TAG" 2>&1 | grep -v -i warn \
    | tee "$d/kv$tag$TAG.log" | tail -30
}
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$d/gpu.txt"
case $stage in
  tests)
    timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$d/tests_full.log" \
      | tail -25 | tee "$d/tests.log" ;;
  op)
    # every cuda-marked test (the default became the adaptive index in session 8: run them all first)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tail -15 | tee "$d/tests.log"
    timeout $(( $(left) - 5 )) $PYK benchmarks/bench_structured.py --mixes mixed local slash vertical \
      --mass $MASSES --out "$d" --tag "$TAG" 2>&1 | grep -v -i warn | tee "$d/op.log" | tail -75 ;;
  mixed)
    # the whole op on `mixed` with today's kernel defaults at 128K-1M: fixed, mass 1.0 (the default) and 0.99
    mixed_op "${MIXED_LENGTHS:-131072 262144 524288 1048576}" _mixed mixed.log ;;
  profile)
    timeout $(( $(left) - 5 )) python3 benchmarks/profile_index.py --lengths $PROFILE_LENGTHS --index-compile \
      --out "$d" --tag "$TAG" 2>&1 | grep -v -i "warn\|USDT" | tee "$d/profile.log" | tail -60 ;;
  check)
    # the index's cuda tests (full log), the op on mixed at $CHECK_LENGTHS; with CHECK_IC the index compiled at 128K
    # (session 16: 150 s cut these tests after 13 of them, and a failure's message with them: 240 s, the twin test first)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/backend/test_cuda_adaptive.py tests/kernels/test_cuda.py \
      tests/backend/test_cuda_backend.py tests/backend/test_index_compile.py \
      -k "estimation or adaptive or selection or full_budget or compile" -rf --tb=short 2>&1 \
      | grep -v "Warning\|warnings.warn" > "$d/tests.log"; tail -12 "$d/tests.log"
    mixed_op "${CHECK_LENGTHS:-131072 262144}" _check mixed_check.log
    [ -n "${CHECK_IC:-}" ] && timeout $(( $(left) - 5 )) python3 benchmarks/profile_index.py --lengths 131072 --modes 1.0 \
      --index-compile --out "$d" --tag "_ic$TAG" 2>&1 | grep -v -i "warn\|USDT" | tee "$d/profile_ic.log" | tail -16 ;;
  verify)
    timeout 100 python3 -m pytest -q -p no:cacheprovider -m cuda tests/backend/test_cuda_adaptive.py -k twins -rf --tb=short \
      2>&1 | grep -v "Warning\|warnings.warn" > "$d/twins.log"; tail -12 "$d/twins.log"
    timeout 280 python3 -m pytest -q -p no:cacheprovider -m cuda tests -rf --tb=short 2>&1 \
      | grep -v "Warning\|warnings.warn" > "$d/tests_full.log"; tail -8 "$d/tests_full.log"
    timeout 90 python3 benchmarks/bench_structured.py --mixes random --lengths 131072 524288 --mass 1.0 0.97 \
      --out "$d" --tag "_random$TAG" 2>&1 | grep -v -i warn | tee "$d/random.log" | tail -6
    OP_MASSES="0.98 0.995" mixed_op "131072 524288 1048576" _verify verify_mixed.log ;;
  blockm)
    mixed_op "$BLOCKM_LENGTHS" _blockm blockm.log --block-m 128 64 ;;
  random)
    timeout $(( $(left) - 5 )) python3 benchmarks/bench_structured.py --mixes random --lengths 131072 524288 \
      --mass $MASSES --out "$d" --tag "_random$TAG" 2>&1 | grep -v -i warn | tee "$d/random.log" | tail -12 ;;
  model)
    timeout $(( $(left) - 5 )) $PYK benchmarks/bench_prefill.py --structured mixed --layers 32 \
      --lengths ${MODEL_LENGTHS:-131072 262144} --plans vs --mass $MODEL_MASSES --block-m $MODEL_BLOCK_M ${MODEL_ARGS:-} --out "$d" --tag "$TAG" 2>&1 | grep -v -i warn \
      | tee "$d/model.log" | tail -40 ;;
  model512)
    timeout $(( $(left) - 5 )) $PYK benchmarks/bench_prefill.py --structured mixed --layers 32 \
      --lengths 524288 --plans vs --mass $MODEL_MASSES --block-m $MODEL_BLOCK_M ${MODEL_ARGS:-} --out "$d" --tag "_512k$TAG" 2>&1 | grep -v -i warn \
      | grep -v "^  run     layer" | tee "$d/model512.log" | tail -12 ;;
  kv)
    # --no-inductor: Dynamo + our op only (session 7's Inductor warm-up compile took 157 s of the step);
    # dense is eager too, and at 1M the matmuls and attention dominate either way
    # KV_ARGS="--warm-len 262144 --mass 0.99": through Inductor, warmed up past its 32-bit-index guard
    snapkv 1048576 _1m --skip sparse ;;
  kv512)
    snapkv "${KV_LENGTHS:-262144 524288}" _512k ;;
  kvall)
    # 256K, 512K, 1M in one run: dense from one layer x 32 (--dense-estimate), sparse with the full cache where it
    # fits (its decode is the full cache's), sparse + kv_budget=4096; eager graphs
    snapkv "${KV_LENGTHS:-262144 524288 1048576}" _all --dense-estimate ;;
  prof)
    timeout $(( $(left) - 5 )) $PYK benchmarks/profile_model.py --lengths $PROF_LENGTHS --layers 2 \
      --modes ${PROF_MODES:-default,fixed} --out "$d" --tag "$TAG" 2>&1 | grep -v -i "warn\|USDT" | tee "$d/prof.log" | tail -90 ;;
  tiles)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_cuda.py -k "paired or attention_kernel" \
      2>&1 | tail -6 | tee "$d/tests.log"
    timeout $(( $(left) - 5 )) python3 benchmarks/bench_tiles.py --lengths 131072 262144 ${TILES_ARGS:-} --out "$d" --tag "$TAG" 2>&1 \
      | grep -v -i warn | tee "$d/tiles.log" | tail -20 ;;
  train)
    # warm start from the shipped weights; 1K-32K pass at once (replayed a quarter of the steps), 64K gets at most
    # a fifth of the time, the rest trains at 128K
    OUT="$d" BUDGET=$TRAIN_S SEEDS=$TRAIN_SEED SHARES=0.02,0.02,0.03,0.2 LENGTHS=16384,32768,65536,131072 \
      timeout $(( $(left) - 5 )) bash train/gpu_long.sh 2>&1 | grep -v -i warn | tail -40
    if [ -n "${EVAL_AFTER:-}" ] && [ -f "$d/seed$TRAIN_SEED/model.safetensors" ]; then
      OUT="$d/eval" MODEL="$d/seed$TRAIN_SEED" LONG_LENGTHS= QS_LENGTHS= TOTAL_S=$(( $(left) - 10 )) \
        bash benchmarks/gpu_eval_long.sh 2>&1 | grep -v -i warn | tail -40
    fi ;;
  eval)
    OUT="$d" LONG_LENGTHS= QS_LENGTHS= TOTAL_S=$(( $(left) - 10 )) EVAL_ARGS="$EVAL_ARGS" \
      bash benchmarks/gpu_eval_long.sh 2>&1 | grep -v -i warn | tail -60 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
echo "::: $stage done in $((SECONDS - T0)) s"
tar czf "$out/$stage.tgz" -C "$out" "$stage"
# the device returns at most 8 files a call: past 7 loose files, the tar alone comes back
[ "$(find "$d" -type f | wc -l)" -gt 7 ] && rm -rf "$d"
exit 0

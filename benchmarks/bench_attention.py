"""Section 1 of BENCHMARKS.md: one attention layer (Llama-3-8B shape), dense vs sparse, on one GPU.

Rows per (scenario, N): cuDNN SDPA, flash SDPA, FlexAttention (compiled, same kept blocks as
aligned 128x64 tiles), ours kernel-only, ours whole op (estimation + top-k + index + kernel, all
heads), and the roofline (kept-key FLOPs over the measured bf16 matmul peak). TFLOP/s count
causal kept pairs only (4 * d per pair). Times are medians of CUDA-event timings after warm-up;
layers too large for memory or time run fewer heads and are scaled to 32 heads ("per head" x 32).

Scenarios (fixed indexes, so nobody tunes to a lucky one):
  band     verticals = 30 first + 970 random columns; slashes = offsets 0..6095
  near16k  verticals as above; slashes = 0..99 + 5996 random offsets below 16384
  estimated  indexes from our own estimation on the benchmark's random Q/K (v 1000, s 6096)
In band/near16k the whole op still runs the estimation and top-k on the same Q/K (timed), then
builds the index from the scenario's verticals/slashes.

  python benchmarks/bench_attention.py --out DIR [--lengths 32768,...] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import mif_compile.kernels as K

H, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
V_BUDGET, S_BUDGET = 1000, 6096
BLOCK_M = 128


def timeit(fn, *, budget_s: float = 1.5, max_reps: int = 50) -> float:
    """Median ms over CUDA events; the repetition count adapts to the first timing."""
    if not torch.cuda.is_available():  # smoke mode
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    first = s.elapsed_time(e)
    reps = max(3, min(max_reps, int(budget_s * 1e3 / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    ms = timeit(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def scenario_vs(name: str, N: int, heads: int, gen: torch.Generator, dev):
    """(v_idx, s_off) int32 [1, heads, *] for the fixed scenarios."""
    nv = min(V_BUDGET, N)
    cols = []
    for _ in range(heads):
        rest = torch.randperm(max(N - 30, 1), generator=gen, device="cpu")[: max(nv - 30, 0)] + 30
        cols.append(torch.cat([torch.arange(min(30, N)), rest[rest < N]])[:nv])
    v_idx = torch.stack(cols)[None].int()
    if name == "band":
        s_off = torch.arange(min(S_BUDGET, N)).expand(1, heads, -1)
    else:  # near16k
        lim = min(16384, N)
        offs = []
        for _ in range(heads):
            rest = torch.randperm(max(lim - 100, 1), generator=gen)[: max(min(S_BUDGET, lim) - 100, 0)] + 100
            offs.append(torch.cat([torch.arange(min(100, N)), rest[rest < lim]]))
        s_off = torch.stack(offs)[None]
    return v_idx.to(dev).contiguous(), s_off.int().to(dev).contiguous()


def scenario_cap_s(name: str, N: int) -> int:
    """Static cap on blocks per row that the scenario can reach (the estimated one: the general bound)."""
    reach = {"band": S_BUDGET, "near16k": 16384}.get(name)
    if reach is None:
        return min(K.max_blocks_per_row(N), S_BUDGET * math.ceil((BLOCK_M + 63) / 64) + 1)
    return min(K.max_blocks_per_row(N), math.ceil((reach + BLOCK_M) / 64) + 2)


def flex_runner(q, k, v, index, N):
    """Compiled FlexAttention over the aligned 128x64 tiles that hold our kept keys (causal mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    bc, bo, cc, ci = (t.long() for t in index)
    B, Hh, NM, cap_s = bo.shape
    big = 1 << 40
    slot = torch.arange(cap_s, device=bo.device)
    okb = slot < bc[..., None]
    a = torch.where(okb, bo // 64, big)
    b2 = torch.where(okb & (bo % 64 != 0), bo // 64 + 1, big)
    okc = torch.arange(ci.shape[-1], device=bo.device) < cc[..., None]
    c = torch.where(okc, ci // 64, big)
    allb = torch.cat([a, b2, c], -1).sort(-1).values
    dup = torch.zeros_like(allb, dtype=torch.bool)
    dup[..., 1:] = allb[..., 1:] == allb[..., :-1]
    allb = torch.where(dup, big, allb).sort(-1).values
    nkv = math.ceil(N / 64)
    m0 = (torch.arange(NM, device=bo.device) * 128)[:, None]
    real = allb < big
    full = real & ((allb + 1) * 64 <= m0 + 1)  # every key <= every query of the block: no mask needed
    part = real & ~full

    def pack(sel):
        idx = torch.where(sel, allb, big).sort(-1).values
        cnt = sel.sum(-1).int()
        idx = torch.nn.functional.pad(idx, (0, max(0, nkv - idx.shape[-1])), value=big)[..., :nkv]  # Flex wants nkv wide
        return cnt, torch.where(idx < big, idx, 0).int().contiguous()

    kv_num, kv_idx = pack(part)
    full_num, full_idx = pack(full)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(128, 64), mask_mod=causal,
                                    seq_lengths=(N, N))
    fn = torch.compile(flex_attention)
    g = Hh // k.shape[1]
    # pairs Flex computes: partial tiles masked causally, full tiles complete (aligned 64-key runs)
    ar_p = torch.arange(kv_idx.shape[-1], device=bo.device)
    ar_f = torch.arange(full_idx.shape[-1], device=bo.device)
    both = torch.cat([torch.where(ar_p < kv_num[..., None], kv_idx, 1 << 30),
                      torch.where(ar_f < full_num[..., None], full_idx, 1 << 30)], -1).sort(-1).values
    tiles = K.SparseIndex((kv_num + full_num).int(), torch.where(both < (1 << 30), both * 64, -1).int(),
                          torch.zeros_like(kv_num), torch.full_like(kv_num[..., None], -1))
    pairs = int(K.count_kept_pairs(tiles, N, 128).sum())
    return (lambda: fn(q, k, v, block_mask=mask, enable_gqa=g > 1)), pairs


def run_length(N: int, args, peak: float, rows: list, gpu: str, versions: dict):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(N)
    big = N >= 512 * 1024
    heads = args.heads or (8 if N >= 1024 * 1024 and not args.smoke else H)
    hkv = max(1, heads * HKV // H)
    scale = D**-0.5
    q = torch.randn(1, heads, N, D, device=dev, dtype=DTYPE if dev == "cuda" else torch.float16)
    k = torch.randn(1, hkv, N, D, device=dev, dtype=q.dtype)
    v = torch.randn(1, hkv, N, D, device=dev, dtype=q.dtype)
    dense_pairs = N * (N + 1) // 2
    g = heads // hkv

    def add(provider, scenario, ms, pairs, nheads, extra=None):
        per_head = ms / nheads
        tflops = 4 * D * pairs / (ms * 1e-3) / 1e12 if pairs else None
        row = dict(kernel="attention_layer", provider=provider, scenario=scenario, N=N, heads_run=nheads,
                   ms=round(ms, 4), ms_per_head=round(per_head, 5), ms_layer_32h=round(per_head * H, 3),
                   tflops=None if tflops is None else round(tflops, 1), gpu=gpu, **versions)
        row.update(extra or {})
        rows.append(row)
        print(f"  {scenario:10s} {provider:24s} {per_head:9.3f} ms/head  {per_head * H:9.2f} ms/layer  "
              f"{'' if tflops is None else f'{tflops:6.1f} TFLOP/s'}", flush=True)
        return per_head

    print(f"N={N} heads={heads} kv_heads={hkv}", flush=True)
    dense_ms = {}
    if dev == "cuda" and not args.no_dense:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        dh = heads if N <= 64 * 1024 else (8 if N <= 128 * 1024 else 4)
        dkv = max(1, dh * HKV // H)
        qd, kd, vd = q[:, :dh], k[:, :dkv], v[:, :dkv]
        for name, backend in (("cudnn_sdpa", SDPBackend.CUDNN_ATTENTION), ("flash_sdpa", SDPBackend.FLASH_ATTENTION)):
            if name == "flash_sdpa" and N > args.flash_max:
                continue
            try:
                with sdpa_kernel(backend):
                    f = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                        qd, kd, vd, is_causal=True, enable_gqa=True)
                    ms = timeit(f, budget_s=3.0)
                dense_ms[name] = add(name, "dense", ms, dense_pairs * dh, dh)
            except Exception as e:  # a backend missing on this build: record why
                print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)

    impl = "triton" if dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    for scen in args.scenarios:
        if scen == "estimated" and N > args.estimated_max:
            continue
        if scen == "estimated":
            col, diag = K.vertical_slash_scores(q, k, last_q=64, scale=scale, impl=impl)
            v_idx, s_off = K.vertical_slash_topk(col, diag, torch.full((heads,), min(V_BUDGET, N)),
                                                 torch.full((heads,), min(S_BUDGET, N)))
        else:
            v_idx, s_off = scenario_vs(scen, N, heads, gen, dev)
        cap_s, cap_v = scenario_cap_s(scen, N), v_idx.shape[-1]
        n_sink = torch.zeros(heads, dtype=torch.int64, device=dev)
        index = K.build_vs_index(v_idx, s_off, n_sink, seq_len=N, block_m=BLOCK_M, cap_s=cap_s, cap_v=cap_v, impl=impl)
        pairs = int(K.count_kept_pairs(index, N, BLOCK_M).sum())
        kernel = lambda: K.sparse_attention(q, k, v, index, scale=scale, block_m=BLOCK_M, impl=impl)  # noqa: E731
        ph = add("ours_kernel", scen, timeit(kernel), pairs, heads,
                 dict(kept_keys_per_row=round(pairs / heads / N, 1), cap_s=cap_s))
        if "cudnn_sdpa" in dense_ms:
            print(f"    kernel speedup vs cuDNN: {dense_ms['cudnn_sdpa'] / ph:.1f}x", flush=True)
        add("roofline", scen, 4 * D * pairs / (peak * 1e12) * 1e3, pairs, heads)

        vcount = torch.full((heads,), min(V_BUDGET, N))
        scount = torch.full((heads,), min(S_BUDGET, N))

        def estimate():
            c_, d_ = K.vertical_slash_scores(q, k, last_q=64, scale=scale, impl=impl)
            return K.vertical_slash_topk(c_, d_, vcount, scount)

        def whole():
            vi, so = estimate()
            if scen != "estimated":
                vi, so = v_idx, s_off
            idx = K.build_vs_index(vi, so, n_sink, seq_len=N, block_m=BLOCK_M, cap_s=cap_s, cap_v=cap_v, impl=impl)
            return K.sparse_attention(q, k, v, idx, scale=scale, block_m=BLOCK_M, impl=impl)

        build = lambda: K.build_vs_index(v_idx, s_off, n_sink, seq_len=N, block_m=BLOCK_M,  # noqa: E731
                                         cap_s=cap_s, cap_v=cap_v, impl=impl)
        add("ours_estimate_topk", scen, timeit(estimate), 0, heads)
        add("ours_index", scen, timeit(build), 0, heads)
        pw = add("ours_whole_op", scen, timeit(whole), pairs, heads)
        if "cudnn_sdpa" in dense_ms:
            print(f"    whole op speedup vs cuDNN: {dense_ms['cudnn_sdpa'] / pw:.1f}x", flush=True)
            rows[-1]["speedup_vs_cudnn"] = round(dense_ms["cudnn_sdpa"] / pw, 2)
        if dev == "cuda" and N in args.flex_lengths and scen == "band":
            fh = 4
            try:
                fidx = K.SparseIndex(*(t[:, :fh] for t in index))
                fkv = max(1, fh * HKV // H)
                f, fpairs = flex_runner(q[:, :fh], k[:, :fkv], v[:, :fkv], fidx, N)
                add("flex_attention", scen, timeit(f), fpairs, fh)
            except Exception as e:
                print(f"  flex failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        del index
    del q, k, v
    if dev == "cuda":
        torch.cuda.empty_cache()


def count_launches(N: int) -> dict:
    """CUDA kernels launched by the whole op (estimation + top-k + index + attention)."""
    from torch.profiler import ProfilerActivity, profile

    heads, hkv = H, HKV
    q = torch.randn(1, heads, N, D, device="cuda", dtype=DTYPE)
    k = torch.randn(1, hkv, N, D, device="cuda", dtype=DTYPE)
    vc, sc = torch.full((heads,), V_BUDGET), torch.full((heads,), S_BUDGET)  # budgets live on the CPU
    n_sink = torch.zeros(heads, dtype=torch.int64, device="cuda")
    out = {}
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            c_, d_ = K.vertical_slash_scores(q, k, last_q=64, scale=D**-0.5)
            torch.cuda.synchronize()
        out["estimation"] = len([e for e in prof.events() if e.device_type.name == "CUDA"])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            vi, so = K.vertical_slash_topk(c_, d_, vc, sc)
            torch.cuda.synchronize()
        out["topk"] = len([e for e in prof.events() if e.device_type.name == "CUDA"])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            idx = K.build_vs_index(vi, so, n_sink, seq_len=N, block_m=BLOCK_M, cap_s=K.max_blocks_per_row(N), cap_v=V_BUDGET)
            torch.cuda.synchronize()
        out["index"] = len([e for e in prof.events() if e.device_type.name == "CUDA"])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            K.sparse_attention(q, k, k, idx, scale=D**-0.5, block_m=BLOCK_M)
            torch.cuda.synchronize()
        out["attention"] = len([e for e in prof.events() if e.device_type.name == "CUDA"])
    return out


def config_sweep(N: int, rows, gpu, versions):
    """Kernel-only time of a few launch configurations in the band scenario."""
    from mif_compile.kernels import attention as A

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, N, D, device="cuda", dtype=DTYPE)
    k = torch.randn(1, HKV, N, D, device="cuda", dtype=DTYPE)
    v = torch.randn(1, HKV, N, D, device="cuda", dtype=DTYPE)
    print(f"config sweep, band, N={N}", flush=True)
    for bm, w, s in ((128, 8, 3), (128, 8, 4), (64, 4, 3), (64, 4, 4), (64, 8, 3)):
        v_idx, s_off = scenario_vs("band", N, H, gen, "cuda")
        n_sink = torch.zeros(H, dtype=torch.int64, device="cuda")
        cap_s = min(K.max_blocks_per_row(N), math.ceil((S_BUDGET + bm) / 64) + 2)
        idx = K.build_vs_index(v_idx, s_off, n_sink, seq_len=N, block_m=bm, cap_s=cap_s, cap_v=V_BUDGET)
        pairs = int(K.count_kept_pairs(idx, N, bm).sum())
        try:
            ms = timeit(lambda: A.sparse_attention(q, k, v, idx, scale=D**-0.5, block_m=bm, num_warps=w, num_stages=s))
        except Exception as e:
            print(f"  BM={bm} w={w} s={s} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        tf = 4 * D * pairs / (ms * 1e-3) / 1e12
        print(f"  BM={bm:3d} warps={w} stages={s}: {ms / H:.4f} ms/head  {tf:.1f} TFLOP/s", flush=True)
        rows.append(dict(kernel="attention_config", provider=f"ours_bm{bm}_w{w}_s{s}", scenario="band", N=N,
                         heads_run=H, ms=round(ms, 4), ms_per_head=round(ms / H, 5), tflops=round(tf, 1), gpu=gpu, **versions))


def crossover(lengths, rows, gpu, versions):
    """Whole op (band and estimated) vs cuDNN SDPA at short lengths: where sparse starts to win."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("crossover (whole op vs cuDNN, 32 heads)", flush=True)
    found = {}
    for N in lengths:
        q = torch.randn(1, H, N, D, device="cuda", dtype=DTYPE)
        k = torch.randn(1, HKV, N, D, device="cuda", dtype=DTYPE)
        v = torch.randn(1, HKV, N, D, device="cuda", dtype=DTYPE)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dms = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        vc, sc = torch.full((H,), min(V_BUDGET, N)), torch.full((H,), min(S_BUDGET, N))
        n_sink = torch.zeros(H, dtype=torch.int64, device="cuda")
        band = scenario_vs("band", N, H, torch.Generator().manual_seed(1), "cuda")

        def whole(fixed):
            c_, d_ = K.vertical_slash_scores(q, k, last_q=64, scale=D**-0.5)
            vi, so = K.vertical_slash_topk(c_, d_, vc, sc)
            if fixed is not None:
                vi, so = fixed
            idx = K.build_vs_index(vi, so, n_sink, seq_len=N, block_m=BLOCK_M, cap_s=K.max_blocks_per_row(N), cap_v=V_BUDGET)
            return K.sparse_attention(q, k, v, idx, scale=D**-0.5, block_m=BLOCK_M)

        wb, we = timeit(lambda: whole(band)), timeit(lambda: whole(None))
        print(f"  N={N:7d} cuDNN {dms:8.3f} ms  whole(band) {wb:8.3f} ms  whole(estimated) {we:8.3f} ms", flush=True)
        rows.append(dict(kernel="crossover", provider="cudnn_vs_whole", N=N, heads_run=H, cudnn_ms=round(dms, 4),
                         whole_band_ms=round(wb, 4), whole_estimated_ms=round(we, 4), gpu=gpu, **versions))
        for key, t in (("band", wb), ("estimated", we)):
            if t < dms and key not in found:
                found[key] = N
        del q, k, v
    print(f"crossover: whole op first beats cuDNN at {found}", flush=True)
    return found


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    layer = [r for r in rows if r["kernel"] == "attention_layer"]
    for ax, key, label in ((axes[0], "ms_layer_32h", "ms per layer (32 heads)"), (axes[1], "tflops", "TFLOP/s on kept keys")):
        series = {}
        for r in layer:
            if r.get(key) is None or r["provider"] in ("ours_estimate_topk", "ours_index"):
                continue
            series.setdefault(f"{r['provider']} [{r['scenario']}]", []).append((r["N"], r[key]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        if key == "ms_layer_32h":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"sparse attention, Llama-3-8B layer (H=32, Hkv=8, d=128, bf16) on {rows[0]['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--lengths", default="32768,65536,131072,262144,524288,1048576")
    ap.add_argument("--scenarios", default="band,near16k,estimated")
    ap.add_argument("--flex-lengths", default="131072,1048576")
    ap.add_argument("--flash-max", type=int, default=524288)
    ap.add_argument("--crossover", default="8192,16384,24576,32768,49152,65536")
    ap.add_argument("--sweep-n", type=int, default=262144)
    ap.add_argument("--heads", type=int, default=0)
    ap.add_argument("--estimated-max", type=int, default=262144, help="random Q/K make estimated indexes nearly dense")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (interpreter), checks the script only")
    args = ap.parse_args(argv)
    args.scenarios = args.scenarios.split(",")
    args.flex_lengths = [int(x) for x in args.flex_lengths.split(",") if x]
    lengths = [int(x) for x in args.lengths.split(",")]
    os.makedirs(args.out, exist_ok=True)
    import triton

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    versions = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    rows = []
    peak = matmul_peak() if cuda else 1.0
    print(f"GPU: {gpu}  bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s  {versions}", flush=True)
    if cuda:
        launches = count_launches(32768)
        print(f"launches of the whole op at N=32K: {launches}", flush=True)
        rows.append(dict(kernel="launches", N=32768, gpu=gpu, **launches, **versions))
        if args.sweep_n:
            config_sweep(args.sweep_n, rows, gpu, versions)
    for N in lengths:
        run_length(N, args, peak, rows, gpu, versions)
        with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
            json.dump(dict(gpu=gpu, peak_tflops=round(peak, 1), rows=rows), f, indent=1)
    if cuda and args.crossover:
        found = crossover([int(x) for x in args.crossover.split(",")], rows, gpu, versions)
        rows.append(dict(kernel="crossover_result", gpu=gpu, **{f"first_win_{k}": v for k, v in found.items()}))
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(dict(gpu=gpu, peak_tflops=round(peak, 1), rows=rows), f, indent=1)
    summary(rows)
    if cuda:
        plot(rows, os.path.join(args.out, "bench_attention.png"))


def summary(rows):
    print("\nsummary: per head ms (x32 = layer), TFLOP/s on kept keys, speedup of the whole op vs cuDNN")
    dense = {r["N"]: r["ms_per_head"] for r in rows if r.get("provider") == "cudnn_sdpa"}
    for r in rows:
        if r.get("kernel") != "attention_layer" or r["provider"] not in ("ours_kernel", "ours_whole_op", "flex_attention"):
            continue
        sp = f"{dense[r['N']] / r['ms_per_head']:6.1f}x" if r["N"] in dense else "   n/a"
        print(f"  N={r['N']:8d} {r['scenario']:10s} {r['provider']:15s} {r['ms_per_head']:8.3f} ms/head "
              f"{r['tflops'] or 0:6.1f} TFLOP/s  vs cuDNN {sp}")


if __name__ == "__main__":
    sys.exit(main())

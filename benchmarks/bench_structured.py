"""Whole op on structured attention (issue 11): cuDNN SDPA vs ours, fixed budgets vs mass-targeted.

For each N and mix (benchmarks/structured.py; "random" is the never-slower case) q/k/v are built on
the device, then, in the same run:
- cuDNN: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` under
  ``sdpa_kernel(CUDNN_ATTENTION)``; timed once per N (dense time does not depend on the values),
  called once per mix for the error columns;
- ours: ``torch.compile(f, backend=mif_compile.backend(**opts))`` with default options but
  ``mass="fixed"`` (MInference's fixed budgets, ``vertical_slash(1000, 6096)``), and once per ``--mass``
  value (``--mass 1.0``: the default options); ``--block-m 64 128`` runs every mode at both query
  blocks of the index and kernel (``MODE@bm64``; "vs fixed" is against the fixed budgets at 128).
``f`` takes q, k and v packed along heads in one tensor whose length is marked dynamic: one compile
serves every N. (With ``dynamic=True`` the head count is symbolic, and with q, k, v as three inputs
their lengths are three symbols; either way the pass cannot prove a causal prefill and stays dense.)
The index alone (estimation, selection, index build: ``search.candidate_index`` with the op's caps and
target) is timed apart as ``index_ms``; the kernel takes the rest of ``ours_ms``.
Times are ``triton.testing.do_bench`` medians; kept density from ``mif_compile.ops.collect_stats()``
(one extra call); output error = relative L2 on 256 sampled rows against exact float32 attention of
those rows (and against cuDNN). Prints a table, writes JSON rows and a PNG plot to ``--out``.

    python benchmarks/bench_structured.py --mass 0.95 --out $OUT
    python benchmarks/bench_structured.py --quick   # CPU, reference path, small N (the test runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from structured import ALL_MIXES, keys_for_mass, mass_profile, sample_rows, structured_qkv  # noqa: E402


def packed_sdpa(heads: int, kv_heads: int):
    def f(x):  # x: [B, H + 2 Hkv, N, D] = q, k, v
        return F.scaled_dot_product_attention(x[:, :heads], x[:, heads:heads + kv_heads], x[:, heads + kv_heads:],
                                              is_causal=True, enable_gqa=True)
    return f


def reference_rows(q, k, v, rows, scale):
    """Exact float32 attention of the sampled rows only: [B, H, R, D] (one head at a time, O(R * N))."""
    b, h, n, d = q.shape
    g = h // k.shape[1]
    keys = torch.arange(n, device=q.device)
    out = torch.empty(b, h, len(rows), d, device=q.device)
    for bi in range(b):
        for hi in range(h):
            s = (q[bi, hi, rows].float() @ k[bi, hi // g].float().T) * scale
            s.masked_fill_(keys[None] > rows[:, None], float("-inf"))
            out[bi, hi] = torch.softmax(s, -1) @ v[bi, hi // g].float()
    return out


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def timer(device, rep_ms):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms)

    def cpu(fn):  # --quick on CPU: one call after the warm-up call (the CPU numbers mean nothing)
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return cpu


def main(argv=None) -> list[dict]:
    import mif_compile
    from mif_compile import HeadPattern
    from mif_compile.search import candidate_index

    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--mixes", nargs="+", default=list(ALL_MIXES), choices=list(ALL_MIXES))
    p.add_argument("--mass", type=float, nargs="*", default=[], help="adaptive index targets, e.g. 0.95")
    p.add_argument("--index-compile", action="store_true",
                   help="every mode also with mif_compile.ops.compile_index() (the vertical-slash choice through "
                        "torch.compile), as MODE+ic, timed in the same run")
    p.add_argument("--block-m", type=int, nargs="+", default=[128], choices=[64, 128],
                   help="query blocks of the index and kernel: each mode runs at each (a mode at 64 is named MODE@bm64)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--error-rows", type=int, default=256)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--tag", default="")
    p.add_argument("--quick", action="store_true", help="small N on CPU with impl='reference' (fixed mode)")
    args = p.parse_args(argv)
    quick = args.quick
    device = torch.device("cpu" if quick or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not quick:
        raise SystemExit("no CUDA device: use --quick for the CPU path")
    if quick:  # budgets scaled down with N, or the fixed budgets cover every key and the op runs dense
        args.lengths = [2048, 3072] if args.lengths == p.get_default("lengths") else args.lengths
        args.heads, args.kv_heads = min(args.heads, 2), min(args.kv_heads, 1)
    dtype = torch.float32 if quick else torch.bfloat16
    base = dict(impl="reference", min_seq_len=0, max_density=1.0,
                default_pattern=HeadPattern.vertical_slash(64, 256)) if quick else {}
    masses = {"fixed": "fixed"} | {f"mass{m:g}": m for m in args.mass}
    modes = {name + ("" if bm == 128 else f"@bm{bm}"): dict(base, mass=m, block_m=bm)
             for bm in sorted(set(args.block_m), reverse=True) for name, m in masses.items()}
    # the index alone (estimation, selection, index build: what the op runs before the kernel), timed apart
    caps = base.get("default_pattern", HeadPattern.vertical_slash()).budget
    cands = {name: HeadPattern.vertical_slash(*caps, mass=o.get("mass")) for name, o in modes.items()}
    h, g, d = args.heads, args.kv_heads, args.head_dim
    f = packed_sdpa(h, g)
    compiled = {name: torch.compile(f, backend=mif_compile.backend(**o), dynamic=False) for name, o in modes.items()}
    ic_variants = (False, True) if args.index_compile else (False,)
    scale = d ** -0.5
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    import triton

    versions = dict(torch=torch.__version__, triton=triton.__version__)

    def dense(q, k, v):
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    # compile at a short length (compile time reported separately, never inside a timing)
    warm_n = min(args.lengths) if quick else 65536
    xw = torch.cat(structured_qkv("mixed", heads=h, kv_heads=g, seq_len=warm_n, head_dim=d, dtype=dtype,
                                  device=device), 1)
    torch._dynamo.mark_dynamic(xw, 2)
    compile_s = {}
    for name, c in compiled.items():
        t0 = time.perf_counter()
        c(xw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_s[name] = round(time.perf_counter() - t0, 2)
    del xw
    print(f"# {gpu}, torch {versions['torch']}, triton {versions['triton']}; {h} query / {g} kv heads, d={d}, "
          f"{dtype}, batch 1; compile (s): {compile_s}")
    print(mif_compile.last_report())
    print(f"{'N':>8} {'mix':>8} {'mode':>9} {'cuDNN ms':>9} {'ours ms':>9} {'index ms':>8} {'speedup':>8} {'vs fixed':>8} "
          f"{'density':>7} {'err ref':>8} {'err cudnn':>9} {'dense err':>9}  95%-keys (median/max), mass shares")
    rows, bench = [], timer(device, 100 if quick else 200)
    for n in args.lengths:
        t_dense = None
        for mix in args.mixes:
            q, k, v, st = structured_qkv(mix, heads=h, kv_heads=g, seq_len=n, head_dim=d, dtype=dtype, device=device,
                                         return_structure=True)
            x = torch.cat([q, k, v], 1)
            torch._dynamo.mark_dynamic(x, 2)
            if t_dense is None:  # once per N: dense time does not depend on the values
                t_dense = bench(lambda: dense(q, k, v))
            kfm = keys_for_mass(q, k, scale=scale).float()
            prof = mass_profile(q, k, st, scale=scale) if st is not None else {}
            shape = f"{kfm.median():.0f}/{kfm.max():.0f} " + " ".join(f"{c[:4]} {s:.2f}" for c, s in prof.items())
            idx = sample_rows(n, args.error_rows).to(device)
            ref = reference_rows(q, k, v, idx, scale)
            out_dense = dense(q, k, v)[:, :, idx]
            err_dense = rel(out_dense, ref)
            fixed_ms = None
            for name, c, ic in [(m, c, ic) for m, c in compiled.items() for ic in ic_variants]:
                mif_compile.ops.compile_index("inductor" if ic else None, devices=(device.type,))
                name = name + ("+ic" if ic else "")
                c(x)  # with --index-compile: the choice compiles here (once per process), not in a timing
                with mif_compile.ops.collect_stats() as stats:
                    out = c(x)[:, :, idx]
                dens = sum(s["density"] for s in stats) / max(len(stats), 1)
                fell = any(s["fell_back_to_dense"] for s in stats)
                ms = bench(lambda: c(x))
                mode = modes[name.removesuffix("+ic")]
                index_ms = bench(lambda: candidate_index(q, k, cands[name.removesuffix("+ic")], scale=scale,
                                                         block_m=mode["block_m"],
                                                         impl="reference" if quick else "triton"))
                if not ic and mode["mass"] == "fixed" and fixed_ms is None:  # block_m 128's fixed when it runs
                    fixed_ms = ms
                row = dict(bench="structured", gpu=gpu, **versions, seq_len=n, mix=mix, mode=name, heads=h, kv_heads=g,
                           head_dim=d, block_m=mode["block_m"], dtype=str(dtype), cudnn_ms=t_dense, ours_ms=ms, index_ms=index_ms,
                           speedup=t_dense / ms,
                           vs_fixed=fixed_ms / ms, density=dens, fell_back_to_dense=fell,
                           err_ref=rel(out, ref), err_cudnn=rel(out, out_dense), err_dense_ref=err_dense,
                           keys95_median=float(kfm.median()), keys95_max=float(kfm.max()), mass_profile=prof,
                           compile_s=compile_s[name.removesuffix("+ic")], index_compile=ic)
                rows.append(row)
                print(f"{n:>8} {mix:>8} {name:>9} {t_dense:9.2f} {ms:9.2f} {index_ms:8.2f} {t_dense / ms:7.2f}x "
                      f"{fixed_ms / ms:7.2f}x "
                      f"{dens:7.3f}{'*' if fell else ' '} {row['err_ref']:8.4f} {row['err_cudnn']:9.4f} "
                      f"{err_dense:9.4f}  {shape}", flush=True)
            del q, k, v, x, ref, out_dense, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
    mif_compile.ops.compile_index(None)
    print("(* = the op fell back to dense: the index kept more than max_density of the pairs)")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_structured{args.tag}")
    with open(stem + ".json", "w") as fh:
        json.dump(rows, fh, indent=1)
    plot(rows, stem + ".png", f"Whole op vs cuDNN, structured q/k/v, {gpu}")
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    """Speedup over cuDNN against N, one line per (mix, mode); skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mix in dict.fromkeys(r["mix"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            r = [x for x in rows if x["mix"] == mix and x["mode"] == mode]
            ax.plot([x["seq_len"] for x in r], [x["speedup"] for x in r], "o-" if mode.startswith("fixed") else "s--",
                    label=f"{mix}, {mode}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("speedup over cuDNN (whole op)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

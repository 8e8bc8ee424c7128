"""Where the vertical-slash index's time goes (issue 11's profile): stage by stage, and kernel by kernel.

The op's index for one layer (``ops.build_layer_index``) runs, for vertical-slash heads:
``estimate`` (``vertical_slash_scores``: the last-64-query probe, column and diagonal sums),
``fixed`` (``vertical_slash_topk``: MInference's top-v / top-s choice; also the fallback of adaptive
heads, so an adaptive layer runs it too), ``select`` (``vertical_slash_select``: the adaptive choice,
``kernels/select.py``), ``choice`` (``ops.vs_choice``: fixed + select + their merge, the part that
``--index-compile`` runs through ``torch.compile``, ``ops.compile_index``) and ``build`` (``build_vs_index``: the block index the kernel reads). Per N and
mode (``fixed`` or a mass target) this times each stage apart on the same structured q/k
(benchmarks/structured.py), the whole ``build_layer_index``, and lists the top device kernels of one
whole call under ``torch.profiler`` with the number of kernel launches: the facts a fused selection
kernel would have to beat; ``kernel_ms`` is the sum of the device kernels' times, so
``index_ms - kernel_ms`` is the device waiting for the host (launches, dispatch). With
``--index-compile`` each mode runs twice, eager and compiled (``MODE+ic``), in the same process. Times
are ``triton.testing.do_bench`` medians on a GPU.

Standalone, a stage whose device work is small is timed at its host cost: nothing runs behind it. In
the op the host may run ahead instead (the next call's index is queued while this call's kernel runs,
up to the op's one device read per call, the ``max_density`` check), so ``attn`` (the sparse kernel alone,
on this index) and ``op`` (``ops.run_layer`` as the backend calls it, default ``max_density``) are timed
too: ``op - attn`` is what the index adds to the op, to set against ``index`` (its standalone time) and
``kernels`` (its device time).

    python benchmarks/profile_index.py --lengths 131072 1048576 --out $OUT     # a GPU
    python benchmarks/profile_index.py --lengths 131072 --index-compile --out $OUT
    python benchmarks/profile_index.py --quick                                 # CPU smoke run (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mif_compile import BackendConfig, HeadPattern, kernels as K, ops  # noqa: E402
from mif_compile.ops import BLOCK_N  # noqa: E402
from structured import structured_qkv  # noqa: E402

STAGES = ("estimate", "fixed", "select", "choice", "build")


def timer(device: torch.device, rep_ms: int):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms)

    def cpu(fn):  # one call after a warm-up call; CPU numbers say nothing about the GPU
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return cpu


def stage_calls(q, k, head: HeadPattern, *, scale: float, last_q: int, block_m: int, impl: str, v=None):
    """name -> a zero-argument call of each stage on the same inputs, and the whole index; with ``v``
    also ``attn`` (the sparse kernel on that index) and ``op`` (the whole op, ``ops.run_layer``)."""
    n = q.shape[2]
    heads = (head,) * q.shape[1]
    codes, b0, b1 = ops.encode_heads(heads)
    mass = ops.encode_mass(heads) if head.adaptive else None
    lp = ops._layer_plan(tuple(codes), tuple(b0), tuple(b1), n, block_m, tuple(mass or ()))
    t = ops._plan_tensors(lp, q.device)
    col, diag = K.vertical_slash_scores(q, k, last_q=last_q, scale=scale, impl=impl)
    v_idx, s_off = K.vertical_slash_topk(col, diag, t["v_count"], t["s_count"], v_max=max(lp.v_count),
                                         s_max=max(lp.s_count))
    caps = dict(last_q=last_q, v_max=max(lp.v_count), s_max=max(lp.s_count))
    if head.adaptive:
        caps.update(a_v_max=max(lp.v_count), a_s_max=max(lp.s_count))
    choice = (col, diag, t["v_count"], t["s_count"], t["mass"], t["is_adaptive"])
    v_idx, s_off, _, _ = ops.vs_choice(*choice, **caps)
    calls = {
        "estimate": lambda: K.vertical_slash_scores(q, k, last_q=last_q, scale=scale, impl=impl),
        "fixed": lambda: K.vertical_slash_topk(col, diag, t["v_count"], t["s_count"], v_max=max(lp.v_count),
                                               s_max=max(lp.s_count)),
        "choice": lambda: ops._choice_fn(q.device)(*choice, **caps),
        "build": lambda: K.build_vs_index(v_idx, s_off, t["n_sink"], seq_len=n, block_m=block_m, block_n=BLOCK_N,
                                          cap_s=lp.cap_s, cap_v=lp.cap_v, impl=impl),
        "index": lambda: ops.build_layer_index(q, k, None, scale, codes, b0, b1, last_q, block_m, impl, mass=mass),
    }
    if v is not None:
        index = calls["index"]()
        calls["attn"] = lambda: K.sparse_attention(q, k, v, index, scale=scale, block_m=block_m, block_n=BLOCK_N,
                                                   impl=impl)
        max_density = BackendConfig().max_density
        calls["op"] = lambda: ops.run_layer(q, k, v, None, scale, codes, b0, b1, 0, last_q, block_m, impl,
                                            max_density, mass)
    if head.adaptive:
        calls["select"] = lambda: K.vertical_slash_select(col, diag, t["v_count"], t["s_count"], t["mass"],
                                                          last_q=last_q, v_max=max(lp.v_count), s_max=max(lp.s_count))
    return calls


def kernel_table(fn, device: torch.device, top: int):
    """(launches, rows): device kernels of one call of ``fn`` under the profiler, the ``top`` longest."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if device.type == "cuda":  # the kernels themselves, each its own time on the device
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:  # the CPU has no kernels: the aten ops (nested ones included), for the smoke run only
        events = [e for e in prof.events() if e.name.startswith("aten::")]
    launches = len(events)
    total_ms = sum(float(e.time_range.elapsed_us()) for e in events) / 1e3
    by_name: dict[str, list] = {}
    for e in events:
        us = float(e.time_range.elapsed_us())
        row = by_name.setdefault(e.name, [0, 0.0])
        row[0] += 1
        row[1] += us
    rows = sorted(({"kernel": name[:90], "calls": c, "us": round(us, 1)} for name, (c, us) in by_name.items()),
                  key=lambda r: -r["us"])
    return launches, total_ms, rows[:top]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    p.add_argument("--mix", default="mixed")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--modes", default="fixed,1.0,0.99", help="comma list: 'fixed' and mass targets")
    p.add_argument("--top", type=int, default=12, help="kernels listed per (N, mode)")
    p.add_argument("--index-compile", action="store_true",
                   help="each mode also with ops.compile_index() (the choice through torch.compile), as MODE+ic")
    p.add_argument("--quick", action="store_true", help="CPU, reference path, small N and caps")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    quick = args.quick
    device = torch.device("cpu" if quick or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not quick:
        raise SystemExit("no CUDA device: use --quick for the CPU path")
    if quick:
        args.lengths = [2048] if args.lengths == p.get_default("lengths") else args.lengths
        args.heads, args.kv_heads, args.head_dim = 2, 1, 32
    caps = (64, 256) if quick else (1000, 6096)
    impl = "reference" if quick else "triton"
    dtype = torch.float32 if quick else torch.bfloat16
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    heads = {m: HeadPattern.vertical_slash(*caps, mass="fixed" if m == "fixed" else float(m)) for m in modes}
    bench = timer(device, 20 if quick else 200)
    scale = args.head_dim ** -0.5
    rows = []
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}; "
          f"{args.heads} query / {args.kv_heads} kv heads, d={args.head_dim}, {dtype}, mix {args.mix}, caps {caps}")
    print(f"{'N':>9} {'mode':>7} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'index':>9} {'kernels':>9} "
          f"{'launches':>8} {'attn':>9} {'op':>9} {'op-attn':>9}  (ms)")
    variants = [(m, False) for m in modes] + ([(m, True) for m in modes] if args.index_compile else [])
    for n in args.lengths:
        q, k, v = structured_qkv(args.mix, heads=args.heads, kv_heads=args.kv_heads, seq_len=n,
                                 head_dim=args.head_dim, dtype=dtype, device=device)
        for mode, compiled in variants:
            ops.compile_index("inductor", devices=(device.type,)) if compiled else ops.compile_index(None)
            calls = stage_calls(q, k, heads[mode], scale=scale, last_q=64, block_m=128, impl=impl, v=v)
            calls["choice"]()  # with --index-compile: compiles here, not inside a timing
            ms = {name: bench(fn) for name, fn in calls.items()}
            launches, kernel_ms, kernels = kernel_table(calls["index"], device, args.top)
            failed = ops.compile_index_failures().get("inductor") if compiled else None
            name = mode + ("+ic" if compiled else "") + ("!" if failed else "")  # !: the compile failed, ran eagerly
            row = dict(seq_len=n, mode=name, mix=args.mix, heads=args.heads, kv_heads=args.kv_heads,
                       head_dim=args.head_dim, device=str(device), torch=torch.__version__, index_compile=compiled,
                       stage_ms={s: ms.get(s) for s in STAGES}, index_ms=ms["index"], kernel_ms=kernel_ms,
                       launches=launches, kernels=kernels, attn_ms=ms["attn"], op_ms=ms["op"],
                       index_compile_failed=failed)
            rows.append(row)
            cells = " ".join(f"{ms[s]:9.3f}" if s in ms else f"{'-':>9}" for s in STAGES)
            print(f"{n:>9} {name:>7} {cells} {ms['index']:9.3f} {kernel_ms:9.3f} {launches:8d} {ms['attn']:9.3f} "
                  f"{ms['op']:9.3f} {ms['op'] - ms['attn']:9.3f}", flush=True)
            for r in kernels[:5]:
                print(f"{'':>16} {r['us']:9.1f} us x{r['calls']:<3} {r['kernel']}")
        del q, k, v
    ops.compile_index(None)
    for backend, err in ops.compile_index_failures().items():
        print(f"(!: torch.compile(backend={backend!r}) of the choice failed, so those rows ran it eagerly: {err})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"profile_index{args.tag}.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()

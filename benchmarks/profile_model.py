"""Where a whole-model prefill spends its time: dense eager vs the compiled sparse model, kernel by kernel.

Session 7's whole-model rows (32 layers, 128K, H200) put dense at 358 ms a layer and ours (0.99) at
137 ms, while the op alone at that shape takes 12.8 ms and cuDNN SDPA alone 60 ms: most of each
layer's time is outside the attention we measure in bench_structured. This script says where:

1. SDPA alone at the layer's shape (32 query / 8 kv heads, d = 128, bf16, causal, ``enable_gqa``), each
   backend (cuDNN, Flash, PyTorch's own choice) on contiguous [B, H, N, D] tensors and on the
   transposed views of [B, N, H, D] that transformers passes.
2. An ``--layers``-layer Llama-3-8B-shaped model (structured weights, ``--structured MIX``) at each
   length: dense eager with cuDNN pinned (bench_prefill's baseline), dense eager with PyTorch's own
   SDPA choice, and ``torch.compile(model, backend=mif_compile.backend(...))`` (``--modes``: ``default``
   is the backend's defaults, ``fixed`` MInference's budgets). Per run: the forward's wall time (median
   of ``--repeats``), then one forward under ``torch.profiler``: device time by kind (attention kernels,
   GEMMs, our Triton index and attention kernels, everything else) and the longest kernels.

    python benchmarks/profile_model.py --lengths 131072 --layers 2 --out benchmarks/results --tag _h100_s11
    python benchmarks/profile_model.py --tiny    # CPU smoke run (a tiny model, aten ops instead of kernels)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mif_compile  # noqa: E402
from profile_index import kernel_table  # noqa: E402

# a kernel's kind from its name (device kernels; on CPU the aten op names)
KINDS = (
    ("sdpa", ("cudnn", "fmha", "flash", "attention_kernel", "scaled_dot_product", "sm90_xmma_fprop", "mem_eff")),
    ("ours_attn", ("_sparse_attn_kernel",)),
    ("ours_index", ("_row_stats_kernel", "_col_diag_kernel", "_vs_index_kernel")),
    ("inductor", ("triton_",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "sm80", "xmma", "aten::mm", "aten::addmm", "aten::linear",
              "aten::matmul", "aten::bmm")),
)


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(s in low for s in keys):
            return k
    return "other"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa_table(n: int, heads: int, kv_heads: int, d: int, device, dtype, repeats: int) -> list[dict]:
    """ms of causal SDPA alone per (backend, layout)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"default": None}
    if device.type == "cuda":
        backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "default": None}
    g = torch.Generator(device=device).manual_seed(0)
    bnhd = [torch.randn(1, n, h, d, device=device, dtype=dtype, generator=g) for h in (heads, kv_heads, kv_heads)]
    layouts = {"contiguous": [t.transpose(1, 2).contiguous() for t in bnhd],
               "transposed": [t.transpose(1, 2) for t in bnhd]}
    rows = []
    for bname, backend in backends.items():
        for lname, (q, k, v) in layouts.items():
            def call():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            row = dict(part="sdpa", seq_len=n, backend=bname, layout=lname, ms=None, error=None)
            try:
                if backend is None:
                    call()
                    row["ms"] = wall_ms(call, repeats, device)
                else:
                    with sdpa_kernel([backend]):
                        call()
                        row["ms"] = wall_ms(call, repeats, device)
            except RuntimeError as e:  # a backend that cannot take these inputs says so
                row["error"] = str(e).splitlines()[0][:160]
            rows.append(row)
            print(f"  sdpa {bname:>8} {lname:>10} "
                  + (f"{row['ms']:9.2f} ms" if row["ms"] is not None else f"   failed: {row['error']}"), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default 131072 (--tiny: 1024)")
    p.add_argument("--layers", type=int, default=None, help="default 2 (--tiny: 2)")
    p.add_argument("--structured", default="mixed", help="structured attention mix (benchmarks/structured_model.py)")
    p.add_argument("--modes", default="default,fixed", help="compiled runs: 'default' (the backend's defaults), "
                   "'fixed' (mass='fixed'), or a mass target")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=10, help="kernels listed per run")
    p.add_argument("--no-sdpa", action="store_true", help="skip part 1 (SDPA alone)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, the reference op")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    lengths = args.lengths or ([1024] if tiny else [131072])
    layers = args.layers or 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from contextlib import nullcontext

    from structured_model import structure_llama, structured_ids
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if tiny:
        from bench_snapkv import build_tiny

        model, gpu, dtype = build_tiny(layers, 256), "cpu (tiny smoke run)", torch.float32
        options = dict(min_seq_len=0, impl="reference", max_density=1.0)
        warm_len = 256
    else:
        from bench_prefill import build

        model, gpu, dtype = build(layers), torch.cuda.get_device_name(), torch.bfloat16
        options = {}
        warm_len = 32768  # the op's min_seq_len: the sparse path compiles in warm-up
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    info = structure_llama(model, mix=args.structured, seed=0)
    print(f"# {gpu}, torch {torch.__version__}; Llama {'tiny' if tiny else '3-8B shape'}, {layers} layers, "
          f"{heads}/{kv_heads} heads, d={d}, structured {args.structured}", flush=True)

    def run(m, ids):
        with torch.no_grad():
            return m(ids, logits_to_keep=1, use_cache=False).logits

    cudnn = nullcontext if tiny else (lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
    runs = {"dense_cudnn": (model, cudnn), "dense_default": (model, nullcontext)}
    for mode in modes:
        opts = dict(options)
        if mode == "fixed":
            opts["mass"] = "fixed"
        elif mode != "default":
            opts["mass"] = float(mode)
        runs[f"ours_{mode}"] = (torch.compile(model, backend=mif_compile.backend(**opts), dynamic=True), nullcontext)
    warm = structured_ids(warm_len, info, cfg.vocab_size, seed=1, device=device)
    compile_s = {}
    for name, (m, ctx) in runs.items():
        t0 = time.perf_counter()
        with ctx():
            run(m, warm)
        _sync(device)
        compile_s[name] = round(time.perf_counter() - t0, 1)
    print(f"# warm-up at {warm_len} (s): {compile_s}", flush=True)

    rows = []
    for n in lengths:
        if not args.no_sdpa:
            rows += sdpa_table(n, heads, kv_heads, d, device, dtype, args.repeats)
        ids = structured_ids(n, info, cfg.vocab_size, seed=n, device=device)
        for name, (m, ctx) in runs.items():
            with ctx(), mif_compile.ops.collect_stats() as stats:
                ms = wall_ms(lambda: run(m, ids), args.repeats, device)
                launches, dev_ms, kernels = kernel_table(lambda: run(m, ids), device, 10_000)
            by_kind: dict[str, float] = {}
            for r in kernels:
                r["kind"] = kind(r["kernel"])
                by_kind[r["kind"]] = by_kind.get(r["kind"], 0.0) + r["us"] / 1e3
            dens = [s["density"] for s in stats if s.get("density") is not None]
            row = dict(part="model", seq_len=n, run=name, layers=layers, gpu=gpu, torch=torch.__version__,
                       wall_ms=ms, device_ms=dev_ms, launches=launches, kind_ms={k: round(v, 3) for k, v in by_kind.items()},
                       kernels=kernels[:args.top], density=(sum(dens) / len(dens)) if dens else None,
                       compile_s=compile_s[name])
            rows.append(row)
            kinds = " ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
            print(f"{n:>8} {name:>14} wall {ms:9.1f} ms ({ms / layers:7.1f} a layer)  device {dev_ms:9.1f} ms in "
                  f"{launches} launches: {kinds}" + (f"  density {row['density']:.3f}" if dens else ""), flush=True)
            for r in kernels[:args.top]:
                print(f"{'':>12} {r['us'] / 1e3:9.2f} ms x{r['calls']:<4} [{r['kind']}] {r['kernel']}")
        del ids
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"profile_model{args.tag}.json")
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)
        print(f"# wrote {path}")
    return rows


if __name__ == "__main__":
    main()

"""Whole op, fixed budgets vs the adaptive (mass-targeted) index vs cuDNN, on attention with structure.

q/k are built the way RoPE makes attention position-dependent (see ``rope_structured``): rotated
pairs give a local window and one distant slash per head, unrotated pairs a sink and heavy keys,
plus noise. Every cell runs through ``torch.compile(f, backend=mif_compile.backend(...))`` with the
op's default settings (min_seq_len, max_density) apart from ``mass``; times are medians of CUDA-event
timings in the same run; kept density comes from ``mif_compile.ops.collect_stats``; the error is the
relative L2 distance to cuDNN's output. ``--random`` times plain randn q/k instead (never slower).

    python benchmarks/bench_adaptive.py --lengths 131072,262144 --mass 0.9,0.95 --out results/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import mif_compile
from mif_compile import HeadPattern


def rope_structured(n, *, heads=8, kv_heads=2, dim=128, seed=0, device="cuda", dtype=torch.bfloat16,
                    local=1.0, slash=1.0, sink=1.0, heavy=1.0, noise=0.3, n_heavy=8):
    """q [1, H, n, D], k, v [1, Hkv, n, D] in O(n * D) memory (structure logits scaled by log n / log 8192). Pairs 0..23 of 64 rotate (local window,
    per-head slash at offset 1000 + 1777 h), pairs 24..63 do not (sink at key 0, heavy keys)."""
    g = torch.Generator(device=device).manual_seed(seed)
    half = dim // 2
    n_rot = 24
    f = torch.arange(half, device=device, dtype=torch.float32)
    theta = torch.where(f < n_rot, 10000.0 ** (-(f + 8) / 40), torch.zeros_like(f))  # [half]
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]

    def rot(xr, xi, ang):
        c, s = torch.cos(ang), torch.sin(ang)
        return xr * c - xi * s, xr * s + xi * c

    amp = (f < n_rot).float()
    scale_logit = dim ** 0.5  # logits = q.k / sqrt(d): put sqrt(d) into q so amplitudes read as logits
    q = torch.zeros(1, heads, n, dim, device=device)
    for h in range(heads):
        w_local = local * (1.0 if h % 2 == 0 else 0.4)
        w_slash = slash * (0.0 if h % 2 == 0 else 0.9)
        off = 1000.0 + 1777.0 * h
        lr, li = rot(amp * w_local, 0 * amp, pos * theta)
        sr, si = rot(amp * w_slash, 0 * amp, (pos - off) * theta)
        q[0, h, :, :half] = lr + sr
        q[0, h, :, half:] = li + si
        q[0, h, :, n_rot] += 1.0  # every query looks along the unrotated sink/heavy direction
    # per-pair logit: q amplitude * k amplitude; 24 rotated pairs at offset 0 sum to 24 * a * b. Logits
    # grow with log(n) (as trained long-context attention sharpens), so the structure stays sparse
    q = q * scale_logit * (math.log(n) / math.log(8192))
    kr, ki = rot(amp.expand(n, half) * 0.5, 0 * amp, pos * theta)
    k = torch.zeros(1, kv_heads, n, dim, device=device)
    k[0, :, :, :half] = kr
    k[0, :, :, half:] = ki
    k[0, :, 0, n_rot] += 14.0 * sink
    idx = torch.randint(1, n, (kv_heads, n_heavy), generator=g, device=device)
    for hk in range(kv_heads):
        k[0, hk, idx[hk], n_rot] += 11.0 * heavy
    q = q + noise * scale_logit * torch.randn(q.shape, generator=g, device=device) / math.sqrt(dim)
    k = k + noise * torch.randn(k.shape, generator=g, device=device) / math.sqrt(dim) * 4
    v = torch.randn(1, kv_heads, n, dim, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def keys_for_mass(q, k, frac=0.95, rows=32):
    """Median over sampled rows (second half of the sequence) of the keys holding ``frac`` of the mass."""
    n = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    out = []
    for r in torch.linspace(n // 2, n - 1, rows).long().tolist():
        s = torch.einsum("hd,hnd->hn", q[0, :, r].float(), k[0, :, : r + 1].float().repeat_interleave(groups, 0))
        p = torch.softmax(s * q.shape[-1] ** -0.5, -1).sort(-1, descending=True).values
        out.append(((p.cumsum(-1) < frac).sum(-1) + 1).float())
    return torch.stack(out).median(0).values.tolist()  # per head


def attn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="131072,262144,524288,1048576")
    ap.add_argument("--mass", default="0.9,0.95")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--random", action="store_true", help="plain randn q/k instead (the never-slower case)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    # one graph per (mode, length); Dynamo's default limit of 8 graphs per function would fall back to eager
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    masses = [float(m) for m in args.mass.split(",") if m]
    modes = {"fixed": "fixed", **{f"mass={m:g}": m for m in masses}}
    compiled = {name: torch.compile(attn, backend=mif_compile.backend(mass=m, default_pattern=HeadPattern.vertical_slash()),
                                    dynamic=False) for name, m in modes.items()}  # one graph per length
    rows = []
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for n in [int(x) for x in args.lengths.split(",")]:
        kinds = ["random"] if args.random else ["structured"]
        for kind in kinds:
            if kind == "structured":
                q, k, v = rope_structured(n, heads=args.heads, kv_heads=args.kv_heads, device=dev)
            else:
                g = torch.Generator(device=dev).manual_seed(1)
                q = torch.randn(1, args.heads, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
                k = torch.randn(1, args.kv_heads, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
                v = torch.randn(1, args.kv_heads, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
            reps = 5 if n <= 262144 else 3
            n95 = keys_for_mass(q, k) if kind == "structured" else None
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t_dense = timed(lambda: attn(q, k, v), reps)
                ref = attn(q, k, v).float()
            row = {"N": n, "kind": kind, "cudnn_ms": t_dense, "keys_95": n95, "gpu": torch.cuda.get_device_name()}
            for name, fn in compiled.items():
                t = timed(lambda: fn(q, k, v), reps)
                with mif_compile.ops.collect_stats() as st:
                    out = fn(q, k, v)
                err = float((out.float() - ref).norm() / ref.norm())
                dens = [s["density"] for s in st]
                fb = any(s["fell_back_to_dense"] for s in st)
                row[name] = {"ms": t, "speedup": t_dense / t, "density": dens[0] if dens else None,
                             "fell_back": fb, "rel_err": err}
                del out
            rows.append(row)
            cells = "  ".join(f"{nm}: {row[nm]['ms']:.1f} ms {row[nm]['speedup']:.1f}x d={row[nm]['density'] or -1:.3f}"
                              f"{' (dense)' if row[nm]['fell_back'] else ''} err={row[nm]['rel_err']:.3f}" for nm in modes)
            print(f"N={n} {kind}: cudnn {t_dense:.1f} ms | {cells} | keys95 {n95}", flush=True)
            del q, k, v, ref
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_adaptive.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)

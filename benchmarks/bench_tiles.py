"""The sparse kernel's tile shapes on the op's own index: single 64-key tiles against paired ones.

On structured attention (benchmarks/structured.py, ``--mix``) at each length, the op's index (the
backend's defaults: ``mass=1.0``, and MInference's fixed budgets) is built once, then the Triton kernel
runs on it in each variant ``single|pair[+fold][+tma]/num_warps/num_stages`` (``pair``: two index blocks,
or 128 columns, per tile; ``fold``: the softmax scale inside the exponent's FMA; ``tma``: descriptor loads;
see kernels/attention.py). Per variant: ms (triton.testing.do_bench), TFLOP/s on the kept
pairs, speed over the first variant, and the largest difference from the first variant's output
(bf16 rounding only: the same keys). cuDNN SDPA on the same q/k/v is timed for scale.

    python benchmarks/bench_tiles.py --lengths 131072 262144 --out benchmarks/results --tag _h100_s11
    python benchmarks/bench_tiles.py --quick     # CPU: the interpreter, 2K tokens (correctness only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mif_compile import HeadPattern, ops  # noqa: E402
from mif_compile.kernels import attention  # noqa: E402
from profile_index import timer  # noqa: E402
from structured import structured_qkv  # noqa: E402

# the default launch first (at block_m 128, d 128: pair + fold + tma), then what the offline compile
# (kernel_resources.py) says spills less, then the kernel before session 12
VARIANTS = ("pair+fold+tma/0/0", "pair+fold+tma+band+c32/0/0", "pair+fold+tma+band+c64/0/0", "pair+fold+tma+c64/0/0",
            "single+fold+tma+band+c32/0/0", "pair+fold+tma/0/2", "single/0/0")


def parse(v: str) -> dict:
    """``single|pair[+fold][+tma][+band][+cNN]/WARPS/STAGES`` -> the launcher's keyword arguments (``band``:
    band_tma; ``cNN``: NN columns a gather; WARPS/STAGES 0: the launcher's default for the block size,
    kernels.attention.default_config)."""
    kind, w, s = v.split("/")
    tile, *mods = kind.split("+")
    cols = [int(m[1:]) for m in mods if m[:1] == "c" and m[1:].isdigit()]
    if tile not in ("single", "pair") or not set(mods) - {f"c{c}" for c in cols} <= {"fold", "tma", "band"}:
        raise SystemExit(f"variant {v!r}: use single/WARPS/STAGES or pair/WARPS/STAGES, optionally +fold, +tma, "
                         "+band and +cNN after the tile")
    return dict(pair=tile == "pair", fold="fold" in mods, tma="tma" in mods, band_tma="band" in mods,
                cols=cols[0] if cols else None, num_warps=int(w) or None, num_stages=int(s) or None)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    p.add_argument("--mix", default="mixed")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--modes", default="1.0,fixed", help="comma list: mass targets and 'fixed'")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--block-m", type=int, nargs="+", default=[128], choices=[64, 128], help="query block sizes")
    p.add_argument("--quick", action="store_true", help="CPU under the Triton interpreter (set TRITON_INTERPRET=1)")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    quick = args.quick
    device = torch.device("cpu" if quick else "cuda")
    if quick:
        args.lengths = [2048] if args.lengths == p.get_default("lengths") else args.lengths
    D = 32 if quick else 128
    dtype = torch.float32 if quick else torch.bfloat16
    caps = (64, 256) if quick else (1000, 6096)
    index_impl = "reference" if quick else "triton"  # the attention variants are always the Triton kernel
    variants = [(v, parse(v)) for v in args.variants]
    bench = timer(device, 300)
    rows = []
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (interpreter)'}, torch {torch.__version__}; "
          f"{args.heads} query / {args.kv_heads} kv heads, d={D}, {dtype}, mix {args.mix}")
    for n in args.lengths:
        q, k, v = structured_qkv(args.mix, heads=args.heads, kv_heads=args.kv_heads, seq_len=n, head_dim=D,
                                 dtype=dtype, device=device)
        scale = D ** -0.5
        cudnn_ms = None
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                cudnn_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True))
        for mode, bm in [(m.strip(), bm) for bm in args.block_m for m in args.modes.split(",") if m.strip()]:
            head = HeadPattern.vertical_slash(*caps, mass="fixed" if mode == "fixed" else float(mode))
            codes, b0, b1 = ops.encode_heads((head,) * args.heads)
            mass = ops.encode_mass((head,) * args.heads) if head.adaptive else None
            index = ops.build_layer_index(q, k, None, scale, codes, b0, b1, 64, bm, index_impl, mass=mass)
            density = float(ops.kept_density(index, n, bm))
            flop = 4.0 * D * density * n * (n + 1) / 2 * args.heads
            base = None
            for name, kw in variants:
                try:
                    out = attention.sparse_attention(q, k, v, index, scale=scale, block_m=bm, **kw)
                    ms = bench(lambda: attention.sparse_attention(q, k, v, index, scale=scale, block_m=bm, **kw))
                except Exception as e:  # e.g. Triton's OutOfResources: a tile shape that does not fit shared memory
                    if base is None:
                        raise
                    print(f"{n:>8} {mode:>6} m{bm:<3} {name:>11} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    rows.append(dict(seq_len=n, mode=mode, block_m=bm, variant=name, error=f"{type(e).__name__}: {e}"[:300]))
                    continue
                diff = 0.0 if base is None else float((out.float() - base[0].float()).abs().max())
                if base is None:
                    base = (out, ms)
                row = dict(seq_len=n, mode=mode, block_m=bm, variant=name, ms=ms, tflops=flop / ms / 1e9, density=density,
                           speedup_vs_first=base[1] / ms, max_diff_vs_first=diff, cudnn_ms=cudnn_ms,
                           heads=args.heads, kv_heads=args.kv_heads, head_dim=D, device=str(device),
                           gpu=torch.cuda.get_device_name() if device.type == "cuda" else None, torch=torch.__version__)
                rows.append(row)
                print(f"{n:>8} {mode:>6} m{bm:<3} {name:>11} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s  x{row['speedup_vs_first']:.3f} "
                      f"vs {variants[0][0]}  max diff {diff:.2e}  density {density:.3f}"
                      + (f"  cuDNN {cudnn_ms:.2f} ms" if cudnn_ms else ""), flush=True)
                save(rows, args)  # after every row: a call cut off at its limit keeps what it measured
        del q, k, v
    return rows


def save(rows: list[dict], args) -> None:
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"bench_tiles{args.tag}.json"), "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

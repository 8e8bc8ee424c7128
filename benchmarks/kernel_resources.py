"""The sparse kernel's registers, spill stack and shared memory per launch variant, without a GPU.

Each variant (bench_tiles.py's syntax: ``single|pair[+fold][+tma][+band][+cNN]/WARPS/STAGES``) is
compiled by this machine's Triton for a Hopper target (sm_90, bf16, GQA 4, no padding) and the cubin's
resource usage is read with the ``cuobjdump`` that Triton ships. A stack above 0 means spilled registers
(255 is the most a thread has); shared memory above 227 KB cannot launch on an H100. It screens variants
before GPU time is spent on them; it says nothing about speed, and the GPU machine's Triton may allocate
differently from this one's.

    python benchmarks/kernel_resources.py --block-m 128 64 --head-dim 128
    python benchmarks/kernel_resources.py --variants pair+fold+tma/0/0 pair+fold+tma+band+c64/0/0
    python benchmarks/kernel_resources.py --index   # the index's small kernels (run-cutting, selection)
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_tiles import parse  # noqa: E402

VARIANTS = ("single/0/0", "pair+fold/0/0", "pair+fold+tma/0/0", "pair+fold+tma+band/0/0", "pair+fold+tma+c64/0/0",
            "pair+fold+tma+band+c64/0/0", "pair+fold+tma+band+c32/0/0", "single+tma+band/0/0",
            "single+fold+tma+band+c32/0/0")
H100_SHARED = 227 * 1024  # the most shared memory one block may take on an H100


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"kernel_resources: no cuobjdump at {path} (this Triton ships no NVIDIA tools)")
    return path


def _regs_and_stack(kern) -> tuple[int, int]:
    """A compiled kernel's registers a thread and spill stack bytes, read from its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
    try:
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return tuple(int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))


def resources(block_m: int, head_dim: int, pair: bool, fold: bool, tma: bool, band_tma: bool, cols, num_warps,
              num_stages, block_n: int = 64) -> dict:
    """Registers a thread, spill stack bytes and shared memory bytes of one compiled variant (sm_90)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from mif_compile.kernels import attention

    fn = attention._sparse_attn_kernel
    w, s = attention.default_config(block_m, head_dim)
    pointers = dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", BC="*i32", BO="*i32", CC="*i32", CI="*i32", PAD="*i8")
    const = dict(GROUPS=4, D_QK=head_dim, D_V=head_dim, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, PAD_D=False,
                 PAD_DV=False, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_M=True, HAS_PADDING=False, PAIR=pair, FOLD=fold,
                 TMA=tma, BAND_TMA=band_tma and tma, COLS=attention._cols(cols, pair, block_n))
    names = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for n in names:
        if n in pointers:
            sig[n] = pointers[n]
        elif n in ("K_DESC", "V_DESC"):
            sig[n] = f"tensordesc<bf16[1, 1, {block_n}, {head_dim}]>" if tma else "*bf16"
        elif n.startswith("stride_"):
            sig[n] = "i64"
        elif n == "qk_scale":
            sig[n] = "fp32"
        elif n in const:
            sig[n] = "constexpr"
        else:
            sig[n] = "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps or w, num_stages=num_stages or s, enable_fp_fusion=True))
    reg, stack = _regs_and_stack(kern)
    return dict(regs=reg, stack_bytes=stack, shared_bytes=int(kern.metadata.shared),
                num_warps=num_warps or w, num_stages=num_stages or s)


# the index's small kernels (session 15): name -> (module, pointer types, constexprs, num_warps)
INDEX_KERNELS = {
    "_vs_runs_kernel": ("index", dict(O="*i32", VIDX="*i32", RUNID="*i32", RFIRST="*i32", RLO="*i32", NS="*i32",
                                      NR="*i32", NV="*i32"), dict(BLOCK=1024), 4),
    "_col_score_kernel": ("select_triton", dict(COL="*fp32", GC="*fp64", GM="*fp32", END="*i64", SINK0="*i64",
                                                CS="*fp32", CM="*fp32", TIE="fp32"),
                          dict(GROUP=64, BLOCK=1024, HAS_SINK=True), 4),
    "_keep_kernel": ("select_triton", dict(CR="*fp32", CI="*i64", CMASS="*fp32", GR="*fp32", GI="*i64", SCUM="*fp32",
                                           VC="*i64", SC="*i64", MASS="*fp32", END="*i64", KEEP="*i8", VOUT="*i32",
                                           SOUT="*i32", SHARE="*fp32", R_FLOOR="fp32"),
                     dict(KP=2048, RP=8, GROUP=64, SB=16), 16),  # KP 2048: the op's caps, 1000 columns + 96 groups
}


def index_kernel_resources(name: str) -> dict:
    """Registers, spill stack and shared memory of one of the index's small kernels, compiled for sm_90."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    mod, pointers, const, warps = INDEX_KERNELS[name]
    fn = getattr(importlib.import_module(f"mif_compile.kernels.{mod}"), name)
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: pointers.get(n, "constexpr" if n in const else "i32") for n in names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, enable_fp_fusion=False))
    reg, stack = _regs_and_stack(kern)
    return dict(regs=reg, stack_bytes=stack, shared_bytes=int(kern.metadata.shared), num_warps=warps)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--block-m", type=int, nargs="+", default=[128], choices=[64, 128])
    p.add_argument("--head-dim", type=int, nargs="+", default=[128])
    p.add_argument("--index", action="store_true", help="the index's small kernels instead of the attention kernel")
    p.add_argument("--out", default=None, help="a JSON file")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _in_child(args)  # under the interpreter the kernel is no JITFunction: compile in a clean process
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    import triton

    rows = []
    if args.index:
        print(f"# triton {triton.__version__}, target sm_90 (offline compile), the index's kernels")
        for name in INDEX_KERNELS:
            row = dict(kernel=name, triton=triton.__version__)
            try:
                row.update(index_kernel_resources(name))
                print(f"{name:>20}  warps {row['num_warps']}  regs {row['regs']:3d}  stack {row['stack_bytes']:5d} B  "
                      f"shared {row['shared_bytes'] / 1024:6.1f} KB", flush=True)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(f"{name:>20}  failed: {row['error']}", flush=True)
            rows.append(row)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
        return rows
    print(f"# triton {triton.__version__}, target sm_90 (offline compile), bf16, GQA 4")
    for bm in args.block_m:
        for d in args.head_dim:
            for v in args.variants:
                kw = parse(v)
                row = dict(variant=v, block_m=bm, head_dim=d, triton=triton.__version__)
                try:
                    row.update(resources(bm, d, **kw))
                except Exception as e:  # a variant Triton cannot compile for this shape
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    print(f"m{bm:<3} d{d:<3} {v:>30}  failed: {row['error'][:100]}", flush=True)
                    rows.append(row)
                    continue
                flag = "  spills" if row["stack_bytes"] else ""
                flag += "  over the H100's shared memory" if row["shared_bytes"] > H100_SHARED else ""
                print(f"m{bm:<3} d{d:<3} {v:>30}  warps {row['num_warps']} stages {row['num_stages']}  "
                      f"regs {row['regs']:3d}  stack {row['stack_bytes']:5d} B  "
                      f"shared {row['shared_bytes'] / 1024:6.1f} KB{flag}", flush=True)
                rows.append(row)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


def _in_child(args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--variants", *args.variants, "--block-m",
               *map(str, args.block_m), "--head-dim", *map(str, args.head_dim), "--out", out] + ["--index"] * args.index
        subprocess.run(cmd, env=env, check=True)
        with open(out) as fh:
            rows = json.load(fh)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()

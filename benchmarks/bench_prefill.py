"""Whole-model prefill (section 2 of BENCHMARKS.md): time to first token, dense vs minference.

Llama-3-8B architecture with random bf16 weights created on the GPU, one forward with
``logits_to_keep=1`` and ``use_cache=False``. Dense baseline: eager SDPA with the cuDNN backend
selected explicitly (the fastest dense way that fits in memory, see BENCHMARKS.md); with
``--compiled-dense`` also ``torch.compile(model, dynamic=True)`` (Inductor, SDPA, the protocol's
row), which materialises the L x L mask: out of memory is reported as nan. Speedups are taken
against the faster of the dense rows that ran. Ours:
``torch.compile(model, backend="minference", dynamic=True)`` compiled once for all lengths, with
  - ``vs``: the default vertical-slash plan, positions estimated on the benchmark's own Q/K
    (random weights: attention has no structure, estimated slashes scatter, and the op's
    max_density guard falls back to dense where that is faster);
  - ``ashape``: A-shape (128, 3968) on every head (static, input independent).
Compile time is reported separately, not inside TTFT. Writes JSON rows and a PNG plot.
``--block-m 128 64`` runs each ``--mass`` row at both query blocks (``vs-massM@bm64``).
``--structured [MIX]`` edits the random weights with benchmarks/structured_model.py so every layer's
attention has structure (default mix "mixed", lengths 128K/256K/512K, prompt ids from
``structured_ids``); ``--mass M ...`` adds a ``vs-massM`` row per value (the backend's ``mass`` setting).
Each row lists the kept density per layer.

    python benchmarks/bench_prefill.py --lengths 32768 65536 131072 --layers 32
    python benchmarks/bench_prefill.py --structured --mass 0.95 --plans vs
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def build(layers: int, heads: int = 32, kv_heads: int = 8, hidden: int = 4096, inter: int = 14336,
          vocab: int = 128256):
    """A random-weight bf16 Llama on the GPU, Llama-3-8B's shape by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=1 << 20,
                      rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def ttft(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[(len(times) - 1) // 2]  # median (the lower one for an even count)


def main() -> None:
    import mif_compile
    from mif_compile import HeadPattern
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default 32K 64K 128K (128K 256K 512K "
                   "with --structured)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--plans", nargs="+", default=["vs", "ashape"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--tag", default="")
    p.add_argument("--compiled-dense", action="store_true", help="also time torch.compile(model) dense")
    p.add_argument("--structured", nargs="?", const="mixed", default=None, help="structured attention mix")
    p.add_argument("--mass", type=float, nargs="*", default=[], help="mass targets of the adaptive index")
    p.add_argument("--no-fixed", action="store_true", help="leave out the row 'vs' (the fixed budgets)")
    p.add_argument("--block-m", type=int, nargs="+", default=[128], choices=[64, 128],
                   help="query blocks of the index and kernel for the --mass rows (64: rows named vs-massM@bm64)")
    args = p.parse_args()
    if args.lengths is None:
        args.lengths = [131072, 262144, 524288] if args.structured else [32768, 65536, 131072]
    gpu = torch.cuda.get_device_name()
    model = build(args.layers)
    plans = {"vs": HeadPattern.vertical_slash(1000, 6096), "ashape": HeadPattern.a_shape(128, 3968)}
    info = None
    if args.structured:
        from structured_model import structure_llama, structured_ids  # benchmarks/ is on sys.path

        info = structure_llama(model, mix=args.structured, seed=0)

    def prompt(n):
        if info is not None:
            return structured_ids(n, info, model.config.vocab_size, seed=n, device="cuda")
        return torch.randint(0, 128256, (1, n), device="cuda")
    rows = []

    def run(m, ids):
        with torch.no_grad():
            return m(ids, logits_to_keep=1, use_cache=False).logits

    compiled = {}
    for name in args.plans:
        fixed = {"mass": "fixed"} if name == "vs" else {}  # row "vs": MInference's fixed budgets
        if not (name == "vs" and args.no_fixed):
            compiled[name] = torch.compile(model, backend=mif_compile.backend(default_pattern=plans[name], **fixed),
                                           dynamic=True)
        if name == "vs":
            for m in args.mass:  # the adaptive index (1.0 at block_m 128: the backend's default)
                for bm in args.block_m:
                    compiled[f"vs-mass{m:g}" + ("" if bm == 128 else f"@bm{bm}")] = torch.compile(
                        model, backend=mif_compile.backend(default_pattern=plans[name], mass=m, block_m=bm),
                        dynamic=True)

    # warm-up and compile (compile time reported separately) at the op's min_seq_len, so that the sparse
    # path runs here and its Triton kernels compile here, not inside the first timed call
    warm = prompt(32768)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        run(model, warm)
    compile_s = {}
    dense_compiled = None
    if args.compiled_dense:
        dense_compiled = torch.compile(model, dynamic=True)
        t0 = time.perf_counter()
        run(dense_compiled, warm)
        torch.cuda.synchronize()
        compile_s["dense"] = time.perf_counter() - t0
    for name, m in compiled.items():
        t0 = time.perf_counter()
        run(m, warm)
        torch.cuda.synchronize()
        compile_s[name] = time.perf_counter() - t0
    print(f"# {gpu}, Llama-3-8B shape, {args.layers} layers, bf16, batch 1, "
          f"{'structured ' + args.structured if info else 'random'} weights; compile (s): {compile_s}")
    print(mif_compile.last_report())
    print(f"{'N':>8} {'plan':>7} {'dense s':>8} {'compiled':>8} {'ours s':>8} {'speedup':>8} {'dense GB':>9} "
          f"{'comp GB':>8} {'ours GB':>8} density")
    for n in args.lengths:
        ids = prompt(n)
        torch.cuda.reset_peak_memory_stats()
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                t_dense = ttft(lambda: run(model, ids), args.repeats)
            mem_dense = torch.cuda.max_memory_allocated() / 1e9
        except torch.OutOfMemoryError:
            t_dense, mem_dense = float("nan"), float("nan")
            torch.cuda.empty_cache()
        t_comp = mem_comp = float("nan")
        if dense_compiled is not None:
            torch.cuda.reset_peak_memory_stats()
            try:
                t_comp = ttft(lambda: run(dense_compiled, ids), args.repeats)
                mem_comp = torch.cuda.max_memory_allocated() / 1e9
            except (torch.OutOfMemoryError, RuntimeError) as e:  # Inductor may wrap the OOM
                if "out of memory" not in str(e).lower():
                    raise
                print(f"# {n}: torch.compile dense is out of memory: {str(e).splitlines()[0][:160]}")
                torch.cuda.empty_cache()
        t_best = min((t for t in (t_dense, t_comp) if t == t), default=float("nan"))
        for name, m in compiled.items():
            torch.cuda.empty_cache()  # the dense run's cached blocks would fragment ours at 512K
            with mif_compile.ops.collect_stats() as stats:
                run(m, ids)  # untimed: densities per layer (one host read per layer)
            torch.cuda.reset_peak_memory_stats()
            t = ttft(lambda: run(m, ids), args.repeats)
            mem = torch.cuda.max_memory_allocated() / 1e9
            dens = [s["density"] for s in stats]
            fell = sum(s["fell_back_to_dense"] for s in stats)
            row = dict(bench="prefill", gpu=gpu, torch=torch.__version__, layers=args.layers, seq_len=n, plan=name,
                       dense_s=t_dense, compiled_dense_s=t_comp, ours_s=t, speedup=t_best / t,
                       speedup_vs_eager=t_dense / t, dense_peak_gb=mem_dense, compiled_dense_peak_gb=mem_comp,
                       ours_peak_gb=mem,
                       mean_density=sum(dens) / max(len(dens), 1), dense_fallback_layers=fell,
                       compile_s=compile_s[name], structured=args.structured, layer_density=dens)
            rows.append(row)
            print(f"{n:>8} {name:>7} {t_dense:8.3f} {t_comp:8.3f} {t:8.3f} {t_best / t:7.2f}x {mem_dense:9.1f} "
                  f"{mem_comp:8.1f} {mem:8.1f} "
                  f"{row['mean_density']:.3f} (dense fallback in {fell}/{len(stats)} layers)", flush=True)
            if info is not None:
                print("   density per layer: " + " ".join(f"{x:.3f}" for x in dens), flush=True)
        del ids
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_prefill{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    from plot_prefill import plot  # benchmarks/ is on sys.path when this file runs as a script

    plot(rows, stem + ".png", f"Prefill, Llama-3-8B shape ({args.layers} layers), {gpu}")


if __name__ == "__main__":
    main()

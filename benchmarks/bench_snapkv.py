"""Long prompts on one GPU: sparse prefill plus SnapKV-style KV-cache compression (issue 14).

Llama-3-8B architecture (bench_prefill.build: random bf16 weights on the GPU; ``--structured MIX``
edits them with benchmarks/structured_model.py so every layer's attention is structured), batch 1.
Per prompt length, one row per run:

- ``dense``: eager, SDPA with the cuDNN backend, a DynamicCache (what generate() holds). Where the
  whole model does not fit, ``ttft_s`` is one decoder layer's dense prefill (a 1-layer model of the
  same shape, no cache) times the layer count, or if that does not fit either one layer's causal SDPA
  alone times the layer count; ``ttft_estimated`` says which (false: measured).
- ``sparse``: ``torch.compile(model, backend=mif_compile.backend(...))``, the full cache.
- ``sparse+snapkv``: the same with ``kv_budget=B`` for each ``--budgets`` value.

Measured: time to first token (one prefill forward with ``logits_to_keep=1``, median of
``--repeats``), peak memory of that prefill, keys per layer and size of the cache it leaves, and
decode tokens/s over that cache (``--decode-tokens`` greedy steps through the same model, explicit
``position_ids``; the first step is not timed). Compile time is taken at a short warm-up length and
reported apart. Out of memory is recorded as such (nan), never as a number. JSON rows to ``--out``.

    python benchmarks/bench_snapkv.py --structured mixed --lengths 262144 524288 1048576 --budgets 1024 4096
    python benchmarks/bench_snapkv.py --tiny          # CPU smoke run of the whole script (seconds)
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NAN = float("nan")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.device(device).type == "cuda" else NAN


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def build_tiny(layers: int, hidden: int = 64):
    """A tiny random Llama on the CPU (4 heads, 2 kv heads; hidden 256 for --structured, whose
    generator needs head_dim 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 16)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _cache_kw(model, cache) -> dict:
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


class Runner:
    """Prefill and decode of one model callable over a fresh DynamicCache."""

    def __init__(self, fn, model, device):
        self.fn, self.model, self.device = fn, model, device

    @torch.no_grad()
    def prefill(self, ids):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.fn(ids, use_cache=True, logits_to_keep=1, **_cache_kw(self.model, cache))
        return out.logits[:, -1].argmax(-1, keepdim=True), cache

    @torch.no_grad()
    def decode(self, tok, cache, start: int, steps: int) -> float:
        """Tokens/s of ``steps`` greedy decode steps after one untimed step."""
        pos = start
        t0 = None
        for i in range(steps + 1):
            if i == 1:
                _sync(self.device)
                t0 = time.perf_counter()
            position_ids = torch.tensor([[pos]], device=self.device)
            out = self.fn(tok, use_cache=True, position_ids=position_ids, **_cache_kw(self.model, cache))
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            pos += 1
        _sync(self.device)
        return steps / (time.perf_counter() - t0) if steps else NAN


def _time(fn, repeats: int, device):
    times, result = [], None
    for _ in range(repeats):
        result = None  # the previous run's cache goes before the next one is made
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[(len(times) - 1) // 2], result


def _cache_facts(cache) -> tuple[list[int], float]:
    keys = [layer.keys.shape[2] for layer in cache.layers]
    size = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return keys, size / 1e9


def main() -> None:
    import transformers

    import mif_compile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default 256K 512K 1M (--tiny: 512 1024)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="kv_budget values (default 1024 4096)")
    p.add_argument("--kv-window", type=int, default=None)
    p.add_argument("--kv-pool", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="default 32 (--tiny: 2)")
    p.add_argument("--structured", nargs="?", const="mixed", default=None, help="structured attention mix")
    p.add_argument("--mass", type=lambda t: t if t == "fixed" else float(t), default=None,
                   help="the backend's mass setting, a target or 'fixed' (default: not set, the backend's 1.0)")
    p.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps (default 32, --tiny 4)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], choices=["dense", "sparse"], help="runs to leave out")
    p.add_argument("--dense-estimate", action="store_true",
                   help="dense TTFT from one layer only (a 1-layer model x the layer count) at every length, "
                        "to save device time; the sparse run without kv_budget measures decode on the full cache")
    p.add_argument("--decode-sdpa", choices=["default", "cudnn"], default="default",
                   help="SDPA backend of the decode steps: PyTorch's choice (default) or cuDNN as in prefill. cuDNN "
                        "runs one query row per (batch, head) tile, likely a poor decode kernel (session 13's runs "
                        "used it for decode)")
    p.add_argument("--no-inductor", action="store_true", help="run the rewritten graphs eagerly")
    p.add_argument("--warm-len", type=int, default=None,
                   help="warm-up (compile) length, default the op's min_seq_len 32768 (--tiny: 256). Inductor guards "
                        "its 32-bit indexing (a tensor of more than 2**31 elements, e.g. the MLP's N x 14336 past "
                        "~150K tokens, compiles again with 64-bit indices): warm up past that, e.g. 262144, so a "
                        "1M prompt does not compile inside its timing")
    p.add_argument("--tiny", action="store_true", help="a tiny CPU model: a smoke run of the whole script")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    layers = args.layers or (2 if tiny else 32)
    lengths = args.lengths or ([512, 1024] if tiny else [262144, 524288, 1048576])
    budgets = args.budgets or ([64, 128] if tiny else [1024, 4096])
    steps = args.decode_tokens if args.decode_tokens is not None else (4 if tiny else 32)
    # the op's min_seq_len: the sparse path and its kernels compile in warm-up
    warm_len = args.warm_len or (256 if tiny else 32768)
    options = dict(min_seq_len=0, impl="reference", max_density=1.0) if tiny else {}
    if args.mass is not None:
        options["mass"] = args.mass
    kv_opts = {k: v for k, v in (("kv_window", args.kv_window), ("kv_pool", args.kv_pool)) if v is not None}
    for b in budgets:  # bad options fail here, before a model is built
        mif_compile.backend(kv_budget=b, **kv_opts, **options)

    if tiny:
        model, gpu = build_tiny(layers, 256 if args.structured else 64), "cpu (tiny smoke run)"
    else:
        from bench_prefill import build

        model, gpu = build(layers), torch.cuda.get_device_name()
    vocab = model.config.vocab_size
    info = None
    if args.structured:
        from structured_model import structure_llama, structured_ids

        info = structure_llama(model, mix=args.structured, seed=0)

    def prompt(n):
        if info is not None:
            return structured_ids(n, info, vocab, seed=n, device=device)
        return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)

    sdpa_ctx = functools.partial(_cudnn_sdpa, tiny)
    decode_ctx = sdpa_ctx if args.decode_sdpa == "cudnn" else nullcontext

    runs = {}
    if "dense" not in args.skip:
        runs["dense"] = (None, Runner(model, model, device))
    compile_opts = dict(inductor=not args.no_inductor, **options)
    if "sparse" not in args.skip:
        runs["sparse"] = (None, Runner(torch.compile(model, backend=mif_compile.backend(**compile_opts), dynamic=True),
                                       model, device))
    for b in budgets:
        backend = mif_compile.backend(kv_budget=b, **kv_opts, **compile_opts)
        runs[f"sparse+snapkv{b}"] = (b, Runner(torch.compile(model, backend=backend, dynamic=True), model, device))

    compile_s = {}
    warm = prompt(warm_len)
    for name, (_, r) in runs.items():
        t0 = time.perf_counter()
        with sdpa_ctx():
            tok, cache = r.prefill(warm)
        with decode_ctx():
            r.decode(tok, cache, warm_len, 2)
        _sync(device)
        compile_s[name] = time.perf_counter() - t0
        del cache
    print(f"# {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, Llama "
          f"{'tiny' if tiny else '3-8B shape'}, {layers} layers, batch 1, "
          f"{'structured ' + args.structured if info else 'random'} weights; "
          f"{'eager (no Inductor)' if args.no_inductor else 'Inductor'}; warm-up at {warm_len} with compile (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()), flush=True)
    for r in mif_compile.reports():
        if any(s.kv for s in r.sites):
            print(r.format())
            break

    rows = []
    weights_gb = sum(t.numel() * t.element_size() for t in model.parameters()) / 1e9
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if device == "cuda" else float("inf")
    print(f"{'N':>8} {'run':>18} {'TTFT s':>9} {'peak GB':>8} {'cache keys':>10} {'cache GB':>8} {'decode tok/s':>12}",
          flush=True)
    for n in lengths:
        ids = prompt(n)
        for name, (budget, r) in runs.items():
            row = dict(bench="snapkv", gpu=gpu, torch=torch.__version__, transformers=transformers.__version__,
                       layers=layers, seq_len=n, run=name.rstrip("0123456789") if budget else name, kv_budget=budget,
                       structured=args.structured, mass=args.mass, ttft_s=NAN, ttft_estimated=False, peak_gb=NAN,
                       cache_keys_per_layer=None, cache_gb=NAN, decode_tok_s=NAN, decode_steps=steps,
                       decode_sdpa=args.decode_sdpa,
                       compile_s=compile_s[name], warm_len=warm_len, error=None)
            cache = None
            _peak_reset(device)
            full_gb = _full_cache_gb(model.config, n) if budget is None else 0.0
            if name == "dense" and args.dense_estimate:
                row["error"] = "not attempted: --dense-estimate"
            elif full_gb + weights_gb > gpu_gb:
                # (session 6: the attempt at 1M ran several layers of dense prefill before it ran out)
                row["error"] = (f"out of memory, not attempted: the full cache ({full_gb:.1f} GB) and the weights "
                                f"({weights_gb:.1f} GB) exceed the GPU's {gpu_gb:.1f} GB")
            else:
                try:
                    with sdpa_ctx():
                        row["ttft_s"], (tok, cache) = _time(lambda: r.prefill(ids), args.repeats, device)
                    row["peak_gb"] = _peak_gb(device)
                    keys, gb = _cache_facts(cache)
                    row["cache_keys_per_layer"], row["cache_gb"] = keys[0] if len(set(keys)) == 1 else keys, gb
                    with decode_ctx():
                        row["decode_tok_s"] = r.decode(tok, cache, n, steps)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not _oom(e):
                        raise
                    row["error"] = "out of memory" + (" in decode" if row["ttft_s"] == row["ttft_s"] else " in prefill")
            cache = tok = None
            if name == "dense" and row["ttft_s"] != row["ttft_s"]:
                row["ttft_s"], how = _per_layer_dense(model, ids, layers, tiny, args.repeats, device)
                row["ttft_estimated"] = how
                row["error"] = f"{row['error']}; ttft_s estimated: {how}"
            rows.append(row)
            keys = row["cache_keys_per_layer"]
            print(f"{n:>8} {name:>18} {row['ttft_s']:9.3f}{'*' if row['ttft_estimated'] else ' '}"
                  f"{row['peak_gb']:8.1f} {str(keys):>10} {row['cache_gb']:8.3f} {row['decode_tok_s']:12.1f}"
                  + (f"  ({row['error']})" if row["error"] else ""), flush=True)
            _peak_reset(device)
        del ids
    print("# * = estimated (the whole model did not fit, or --dense-estimate): a 1-layer model's dense prefill, or one layer's SDPA alone, "
          "x the layer count; see each row's ttft_estimated")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_snapkv{args.tag}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"# wrote {path}")


def _full_cache_gb(cfg, n: int) -> float:
    """GB of a full bf16 k/v cache of every layer at ``n`` tokens (batch 1)."""
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * n * cfg.num_key_value_heads * d * 2 / 1e9


def _cudnn_sdpa(tiny: bool):
    """SDPA pinned to cuDNN (the dense baseline and prefill on the GPU); nothing for the --tiny CPU run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return nullcontext() if tiny else sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def _per_layer_dense(model, ids, layers: int, tiny: bool, repeats: int, device):
    """(seconds x ``layers``, how): one decoder layer's dense prefill (a 1-layer model of the same
    shape, eager cuDNN SDPA, no cache), or where even that does not fit, one layer's causal SDPA alone
    (random q/k/v of the layer's shape, k/v repeated for GQA); (nan, ...) when neither fits."""
    ctx = functools.partial(_cudnn_sdpa, tiny)
    cfg = model.config
    one = build_tiny(1, cfg.hidden_size) if tiny else __import__("bench_prefill").build(1)
    try:
        with torch.no_grad(), ctx():
            t, _ = _time(lambda: one(ids, use_cache=False, logits_to_keep=1).logits, repeats, device)
        return t * layers, "1-layer model x layers"
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _oom(e):
            raise
    finally:
        del one
        _peak_reset(device)
    n, h, d = ids.shape[1], cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    try:
        dtype = torch.float32 if tiny else torch.bfloat16
        q, k, v = (torch.randn(1, h, n, d, device=device, dtype=dtype) for _ in range(3))
        with torch.no_grad(), ctx():
            t, _ = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), repeats,
                         device)
        return t * layers, "attention (SDPA) only x layers"
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _oom(e):
            raise
        return NAN, "did not fit"
    finally:
        q = k = v = None
        _peak_reset(device)


if __name__ == "__main__":
    main()

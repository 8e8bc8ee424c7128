"""Peak memory of the op at 32K tokens on CPU, measured in a child process (``ru_maxrss`` growth).

Before issue 10 the padded dense path built an N x N ``tril`` and a (B, 1, N, N) mask (+6.3 GB at 32K
on a tiny model) and the reference sparse path took +2.3 GB for 2 heads. Each case runs in a fresh
interpreter: inputs are made and everything is warmed up at a short length first, then the peak RSS
growth of one call at N = 32768 is compared with eager SDPA's (``is_causal=True``) in the same child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

N = 32768
LIMIT_MB = 256  # about 20 MB for eager flash SDPA; the old paths took 2.3-6.3 GB

_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    import mif_compile
    from mif_compile import HeadPattern
    from mif_compile.ops import encode_heads

    torch.set_num_threads(2)
    case, n = sys.argv[1], int(sys.argv[2])
    codes, b0, b1 = encode_heads([HeadPattern.vertical_slash(30, 50)] * 2)

    def call(q, k, v, pad):
        if case == "eager":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        min_len = 1 << 30 if case == "dense_padded" else 0
        return torch.ops.mif.sparse_attention(q, k, v, pad, 0.25, codes, b0, b1, min_len, 64, 128, "reference", 1.0)

    def inputs(n):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
        pad = torch.ones(1, n, dtype=torch.bool)
        pad[:, : n // 8] = False  # left padding
        return q, k, v, pad

    with torch.no_grad():
        call(*inputs(1024))  # warm-up: kernels, allocator, lazy imports
        x = inputs(n)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = call(*x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.shape == (1, 2, n, 16) and bool(torch.isfinite(out[:, :, n // 8:]).all())
    print(json.dumps({"growth_mb": (after - before) / 1024}))
""")


def _growth_mb(case: str, n: int = N) -> float:
    res = subprocess.run([sys.executable, "-c", _CHILD, case, str(n)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["growth_mb"]


@pytest.mark.parametrize("case", ["dense_padded", "sparse"])
def test_peak_memory_at_32k_is_bounded(case):
    grown = _growth_mb(case)
    eager = _growth_mb("eager")
    assert grown < LIMIT_MB, f"{case}: +{grown:.0f} MB at N={N} (eager flash SDPA: +{eager:.0f} MB)"


_KV_CHILD = textwrap.dedent("""
    import gc, json, sys
    import torch
    import mif_compile
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    budget, n = (None if sys.argv[1] == "none" else int(sys.argv[1])), int(sys.argv[2])
    cfg = LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=256, num_hidden_layers=16,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1 << 16)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    model.forward = torch.compile(model.forward, dynamic=True, backend=mif_compile.backend(
        inductor=False, min_seq_len=0, kv_budget=budget))  # impl "auto": dense SDPA on CPU, votes by the estimation
    name = "cache" if "cache" in __import__("inspect").signature(model.forward).parameters else "past_key_values"

    def prefill(n):
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            model(torch.randint(0, 96, (1, n)), use_cache=True, logits_to_keep=1, **{name: cache})
        return cache

    def status(field):  # kB
        return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

    prefill(512)  # compiles at a short length
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # the peak RSS restarts here, not at the compile's peak
        f.write("5")
    before = status("VmRSS:")
    cache = prefill(n)
    after = status("VmHWM:")
    keys = [layer.keys.shape[2] for layer in cache.layers]
    print(json.dumps({"growth_mb": (after - before) / 1024, "keys": keys}))
""")


def test_compressed_prefill_never_holds_every_layers_full_cache():
    """16 layers at 2K tokens: the full k/v of all layers is 128 MiB, a layer's activations a few MiB; with
    kv_budget each layer's full k/v dies with the layer, so the peak stays about that much below the
    uncompressed prefill's."""
    n = 2048
    all_layers_mb = 16 * 2 * 4 * n * 128 * 4 / 2**20
    runs = {}
    for budget in ("none", "128"):
        # big blocks straight from mmap, given back when freed: RSS then follows the live tensors (glibc's
        # dynamic threshold would move 16 MB blocks to the heap, whose holes keep RSS up)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
        res = subprocess.run([sys.executable, "-c", _KV_CHILD, budget, str(n)], capture_output=True, text=True,
                             timeout=900, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[budget] = json.loads(res.stdout.strip().splitlines()[-1])
    assert runs["none"]["keys"] == [n] * 16 and runs["128"]["keys"] == [128] * 16
    full, kept = runs["none"]["growth_mb"], runs["128"]["growth_mb"]
    assert full > all_layers_mb, runs  # the uncompressed prefill holds every layer's cache
    assert kept < full - 0.75 * all_layers_mb, runs

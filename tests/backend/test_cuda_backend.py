"""The backend on a GPU: Triton kernels inside a compiled HF model (bf16), against the reference
path on the same GPU, and the op captured in a CUDA graph (no host synchronisation inside)."""

from __future__ import annotations

import pytest
import torch

import mif_compile
from mif_compile import BackendConfig, HeadPattern, ModelPlan, Pattern
from mif_compile.ops import encode_heads, run_layer
from mif_compile.testing import assert_close_to_ref64  # noqa: F401  (same helper as the kernel tests)
from tests.backend.models import tiny_llama

pytestmark = pytest.mark.cuda

MIXED = ModelPlan(layers=(
    (HeadPattern.vertical_slash(64, 256), HeadPattern.a_shape(64, 256),
     HeadPattern.block_sparse(4), HeadPattern.vertical_slash(30, 128)),
    (HeadPattern.vertical_slash(100, 300),) * 4,
))


def _model(dtype=torch.bfloat16):
    return tiny_llama(hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=512).to("cuda", dtype)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_compiled_model_full_budget_equals_dense(impl):
    model = _model()
    ids = torch.randint(0, 96, (2, 3000), device="cuda")
    full = HeadPattern.vertical_slash(4096, 4096)
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = torch.compile(model, backend="minference", dynamic=True,
                            options=dict(min_seq_len=0, default_pattern=full, impl=impl, max_density=1.0))(ids).logits.float()
    assert len(mif_compile.last_report().rewritten) == 2
    err = (out - ref).norm() / ref.norm()
    assert err < 2e-2, err


def test_compiled_model_triton_equals_reference_padded():
    model = _model()
    ids = torch.randint(0, 96, (2, 2500), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :700] = 0
    with torch.no_grad():
        outs = {}
        for impl in ("triton", "reference"):
            torch._dynamo.reset()
            comp = torch.compile(model, backend="minference", dynamic=True,
                                 options=dict(min_seq_len=0, config=MIXED, impl=impl, max_density=1.0))
            outs[impl] = comp(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    a, b = outs["triton"][real], outs["reference"][real]
    assert torch.isfinite(a).all()
    assert ((a - b).norm() / b.norm()) < 2e-2


@pytest.mark.parametrize("adaptive", [False, True])
def test_op_is_cuda_graph_capturable(adaptive):
    """The op in a CUDA graph, with the fixed budgets and with the adaptive index (the backend's default):
    no host sync, no allocation that outlives the call; a replay recomputes everything."""
    torch.manual_seed(0)
    B, H, Hkv, N, D = 1, 4, 2, 4096, 128
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    heads = MIXED.layers[0]
    codes, b0, b1 = encode_heads(heads)
    mass = [1.0 if hp.pattern is Pattern.VERTICAL_SLASH else 0.0 for hp in heads] if adaptive else None
    args = (None, D ** -0.5, codes, b0, b1, 0, 64, 64, "triton", 1.0, mass)
    eager = run_layer(q, k, v, *args)  # warm-up: compiles kernels, pins the plan on the host
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_layer(q, k, v, *args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = run_layer(q, k, v, *args)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    fresh = run_layer(q, k, v, *args)
    # the replay recomputed everything for the new q (estimation may sum with atomics: not bitwise)
    assert ((static_out.float() - fresh.float()).norm() / fresh.float().norm()) < 1e-2
    assert ((static_out.float() - eager.float()).norm() / eager.float().norm()) > 1e-1


def early_static_cache(model, max_len: int):
    """A StaticCache allocated before the first compiled call (its tensors then have static addresses)."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch_size=1, num_heads=cfg.num_key_value_heads, head_dim=head_dim,
                               dtype=model.dtype, device=model.device)
    return cache


@pytest.mark.parametrize("cache,hf_compiles_decode", [("static", False), ("static", True), ("dynamic", False)])
def test_generate_reduce_overhead(cache, hf_compiles_decode):
    """mode="reduce-overhead" with generate(): greedy tokens equal dense. Prefill graphs run without
    CUDA graphs (rewritten where transformers lets the pass prove it, else dense with the reason);
    decode graphs over an early-initialised static cache run in CUDA graphs, compiled by our backend
    (disable_compile=True) or by generate()'s own auto-compilation; over the dynamic cache the backend
    keeps decode out of CUDA graphs (cudagraph trees would overwrite the concatenated cache)."""
    from torch._dynamo.utils import counters

    model = _model(torch.float16)
    ids = torch.randint(0, 96, (1, 1500), device="cuda")
    full = HeadPattern.vertical_slash(4096, 4096)

    def kw(disable_compile):
        d = dict(max_new_tokens=8, do_sample=False, disable_compile=disable_compile)
        if cache == "static":
            d["past_key_values"] = early_static_cache(model, 1600)
        return d

    with torch.no_grad():
        ref = model.generate(ids, **kw(True))
        model.forward = torch.compile(model.forward, backend="minference", options=dict(
            mode="reduce-overhead", min_seq_len=0, default_pattern=full, max_density=1.0))
        counters.clear()
        out = model.generate(ids, **kw(not hf_compiles_decode))
    assert torch.equal(out, ref), (out[0, -8:], ref[0, -8:])
    reports = mif_compile.reports()
    sites = [s for r in reports for s in r.sites]
    assert any(s.rewritten or "q_len != kv_len" in s.reason for s in sites), [s.reason for s in sites]
    decode = [r for r in reports if r.sites and all(s.q_len == 1 for s in r.sites)]
    if hf_compiles_decode:
        return
    assert decode, "decode graphs should reach the backend"
    if cache == "static":
        assert all(not r.notes for r in decode), [r.notes for r in decode]
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    else:
        assert all("torch.cat" in r.format() for r in decode)


def test_op_in_cudagraph_trees_replays_new_inputs():
    """prefill_cudagraphs=True: the op is warmed up, recorded and replayed by cudagraph trees (no
    allocation outlives a call, no host sync), and each replay computes its own input's answer."""
    from torch._dynamo.utils import counters

    model = _model(torch.float16)
    full = HeadPattern.vertical_slash(4096, 4096)
    comp = torch.compile(model, backend=mif_compile.backend(
        mode="reduce-overhead", prefill_cudagraphs=True, min_seq_len=0, default_pattern=full, max_density=1.0))
    counters.clear()
    with torch.no_grad():
        for seed in range(4):  # warm-up, record, then replays
            ids = torch.randint(0, 96, (1, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            torch.compiler.cudagraph_mark_step_begin()
            out = comp(ids, use_cache=False).logits.float().clone()
            ref = model(ids, use_cache=False).logits.float()
            err = (out - ref).norm() / ref.norm()
            assert err < 2e-2, (seed, err)
    report = mif_compile.last_report()
    assert len(report.rewritten) == 2 and not report.notes, report.format()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])

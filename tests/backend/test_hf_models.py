"""End to end on tiny random-weight HF models: the backend rewrites every prefill attention,
matches dense with a full-coverage budget, matches the eager reference with sparse budgets, and
leaves decode alone."""

from __future__ import annotations

import pytest
import torch

import mif_compile
from mif_compile import BackendConfig, HeadPattern, ModelPlan
from tests.backend.models import MODELS, use_reference_attention

N = 320  # long enough for sparse budgets to drop keys (5 blocks of 64)
FULL = HeadPattern.vertical_slash(v=4096, s=4096)  # covers every key at these lengths
SPARSE = ModelPlan(
    layers=(
        (HeadPattern.vertical_slash(40, 120), HeadPattern.a_shape(64, 128),
         HeadPattern.block_sparse(2), HeadPattern.vertical_slash(30, 100)),
        (HeadPattern.vertical_slash(64, 150),) * 4,
    )
)


def _compile(model, **options):
    options.setdefault("min_seq_len", 0)
    options.setdefault("inductor", False)
    options.setdefault("max_density", 1.0)  # always sparse: these short prompts keep most pairs
    options.setdefault("impl", "reference")  # on CPU "auto" runs dense SDPA
    return torch.compile(model, backend="minference", options=options, dynamic=True)


def _ids(batch=1, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, n), generator=g)


@pytest.mark.parametrize("arch", list(MODELS))
def test_full_budget_equals_dense(arch):
    model = MODELS[arch]()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        out = _compile(model, default_pattern=FULL)(ids).logits
    report = mif_compile.last_report()
    assert len(report.rewritten) == model.config.num_hidden_layers
    assert report.counters["rewritten"] == model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("use_cache", [True, False])
def test_sparse_equals_eager_reference(arch, use_cache):
    model = MODELS[arch]()
    ids = _ids()
    if arch == "qwen2":
        plan = ModelPlan(layers=tuple(tuple(layer) for layer in SPARSE.layers))
    else:
        plan = SPARSE
    with torch.no_grad():
        dense = model(ids, use_cache=use_cache).logits
        out = _compile(model, config=plan)(ids, use_cache=use_cache).logits
        report = mif_compile.last_report()
        ref = use_reference_attention(model, BackendConfig(plan=plan, min_seq_len=0, max_density=1.0))(ids, use_cache=use_cache).logits
    assert len(report.rewritten) == 2, report.format()
    assert (dense - ref).abs().max() > 1e-3, "the sparse budget should change the output"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_ones_mask_and_left_padding_are_exact():
    model = tiny_model = MODELS["llama"]()
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0  # left padding of the first sequence
    with torch.no_grad():
        ref_full = model(ids, attention_mask=mask).logits
        comp = _compile(model, default_pattern=FULL)
        out_full = comp(ids, attention_mask=mask).logits
        report = mif_compile.last_report()
        assert [s.reason for s in report.rewritten] == ["causal+padding"] * 2, report.format()
        out_ones = comp(ids, attention_mask=torch.ones_like(ids)).logits
        ref_ones = model(ids, attention_mask=torch.ones_like(ids)).logits
        out_sparse = comp(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out_full[real], ref_full[real], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out_ones, ref_ones, atol=2e-5, rtol=2e-5)
    del tiny_model, out_sparse

    torch._dynamo.reset()
    with torch.no_grad():
        out = _compile(model, config=SPARSE)(ids, attention_mask=mask).logits
        ref = use_reference_attention(model, BackendConfig(plan=SPARSE, min_seq_len=0, max_density=1.0))(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=2e-5)


def test_generate_prefill_sparse_decode_dense():
    model = MODELS["llama"]()
    ids = _ids(n=200)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(
        model.forward, backend="minference",
        options=dict(min_seq_len=0, default_pattern=FULL, inductor=False, max_density=1.0, impl="reference"),
        dynamic=True,
    )
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    reports = mif_compile.reports()
    prefill = [r for r in reports if r.rewritten]
    decode = [r for r in reports if r.sites and not r.rewritten]
    assert prefill and decode, "\n".join(r.format() for r in reports)
    assert all("decode" in s.reason or "q_len" in s.reason for r in decode for s in r.dense)


@pytest.mark.parametrize("how", ["module.compile", "forward"])
def test_generate_left_padded_batch_both_compile_forms(how):
    """`model.compile(backend=...)` and `model.forward = torch.compile(...)`: a left-padded batch of
    two generates exactly the dense tokens, prefill rewritten with the padding, decode dense."""
    model = MODELS["llama"]()
    ids = _ids(batch=2, n=200)
    mask = torch.ones_like(ids)
    mask[1, :29] = 0
    options = dict(min_seq_len=0, default_pattern=FULL, inductor=False, max_density=1.0, impl="reference")
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        if how == "module.compile":
            model.compile(backend="minference", options=options, dynamic=True)
        else:
            model.forward = torch.compile(model.forward, backend="minference", options=options, dynamic=True)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)
    sites = [s for r in mif_compile.reports() for s in r.sites]
    assert [s.reason for s in sites if s.rewritten] == ["causal+padding"] * model.config.num_hidden_layers
    assert any(not s.rewritten for s in sites), "decode steps should have been seen and left dense"


def test_generate_sparse_matches_reference_generate():
    model = MODELS["llama"]()
    ids = _ids(n=N)
    with torch.no_grad():
        compiled = MODELS["llama"]()
        compiled.forward = torch.compile(compiled.forward, backend="minference",
                                         options=dict(min_seq_len=0, config=SPARSE, inductor=False, max_density=1.0, impl="reference"), dynamic=True)
        out = compiled.generate(ids, max_new_tokens=4, do_sample=False)
        ref = use_reference_attention(model, BackendConfig(plan=SPARSE, min_seq_len=0, max_density=1.0)).generate(
            ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_no_recompile_over_lengths():
    model = MODELS["llama"]()
    calls = []
    inner = mif_compile.backend(min_seq_len=0, default_pattern=HeadPattern.vertical_slash(40, 120), inductor=False,
                                max_density=1.0, impl="reference")

    def counting(gm, example_inputs, **kw):
        calls.append(gm)
        return inner(gm, example_inputs, **kw)

    comp = torch.compile(model, backend=counting, dynamic=True)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for n in (130, 257, 391):
            ids = _ids(n=n, seed=n)
            out = comp(ids).logits
            ref = use_reference_attention(MODELS["llama"](), BackendConfig(
                default_pattern=HeadPattern.vertical_slash(40, 120), min_seq_len=0, max_density=1.0))(ids).logits
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    distinct = {id(g) for g in calls}
    assert len(calls) <= 2 and len(distinct) == len(calls)  # one frame (Dynamo may restart analysis once)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1


def test_inductor_compiles_the_rewritten_graph():
    model = MODELS["llama"]()
    ids = _ids(n=256)
    with torch.no_grad():
        ref = use_reference_attention(MODELS["llama"](), BackendConfig(plan=SPARSE, min_seq_len=0, max_density=1.0))(ids).logits
        out = torch.compile(model, backend="minference", options=dict(
            min_seq_len=0, config=SPARSE, max_density=1.0, impl="reference"))(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_dense_fallback_when_the_index_is_nearly_dense():
    model = MODELS["llama"]()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        comp = _compile(model, config=SPARSE, max_density=0.5)
        with mif_compile.ops.collect_stats() as rows:
            out = comp(ids).logits
    assert len(rows) == 2 and all(r["density"] > 0.5 and r["fell_back_to_dense"] for r in rows), rows
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


def test_static_cache_generate_is_exact():
    model = MODELS["llama"]()
    ids = _ids(n=200)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
        model.forward = torch.compile(model.forward, backend="minference", dynamic=True,
                                      options=dict(min_seq_len=0, default_pattern=FULL, inductor=False, max_density=1.0, impl="reference"))
        out = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)
    sites = [s for r in mif_compile.reports() for s in r.sites]
    # the prefill is rewritten where q_len == kv_len is proven (transformers 5.23), else left dense
    # with its reason (5.17 attends over the preallocated cache: "q_len != kv_len")
    assert all(s.reason in ("causal", "causal+padding") for s in sites if s.rewritten)
    assert all(s.reason for s in sites if not s.rewritten)
    assert any(s.rewritten or "q_len != kv_len" in s.reason for s in sites), [s.reason for s in sites]


def test_chunked_prefill_is_exact_and_reported():
    from transformers import DynamicCache

    model = MODELS["llama"]()
    ids = _ids(n=300)
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
        comp = _compile(model, default_pattern=FULL)
        cache = DynamicCache(config=model.config)
        comp(ids[:, :150], past_key_values=cache, use_cache=True)
        out = comp(ids[:, 150:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    second = mif_compile.last_report()
    assert not second.rewritten and all("q_len != kv_len" in s.reason for s in second.dense), second.format()


def test_options_may_carry_the_inductor_mode(monkeypatch):
    import sys

    seen = {}
    mod = sys.modules["mif_compile.backend"]
    real = mod.compile_graph

    def spy(gm, example_inputs, cfg, *, mode=None, inductor=True, **kw):
        seen["mode"], seen["min_seq_len"] = mode, cfg.min_seq_len
        return real(gm, example_inputs, cfg, mode=mode, inductor=False, **kw)

    monkeypatch.setattr(mod, "compile_graph", spy)
    model = MODELS["llama"]()
    with torch.no_grad():
        torch.compile(model, backend="minference", options=dict(
            mode="max-autotune-no-cudagraphs", min_seq_len=7, impl="reference"))(_ids())
    assert seen == {"mode": "max-autotune-no-cudagraphs", "min_seq_len": 7}


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("prefill_cudagraphs", [False, True])
def test_reduce_overhead_keeps_cuda_graphs_for_decode_only(monkeypatch, prefill_cudagraphs, cache):
    """Under mode="reduce-overhead" a prefill graph is compiled without CUDA graphs unless
    prefill_cudagraphs=True, and its report says so; decode graphs (query length 1) keep them,
    except over a cache grown by torch.cat (DynamicCache), which cudagraph trees would overwrite."""
    import torch._inductor.compile_fx as cfx

    patches = []

    def spy(gm, example_inputs, config_patches=None, **kw):
        patches.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", spy)
    model = MODELS["llama"]()
    ids = _ids(n=200)
    kw = dict(max_new_tokens=3, do_sample=False)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.forward = torch.compile(model.forward, backend="minference", dynamic=True, options=dict(
            mode="reduce-overhead", prefill_cudagraphs=prefill_cudagraphs, min_seq_len=0, default_pattern=FULL,
            max_density=1.0, impl="reference"))
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)
    reports = mif_compile.reports()
    assert len(patches) == len(reports) >= 2
    # transformers 5.23 lets the pass rewrite the static-cache prefill; 5.17 leaves it dense (q_len != kv_len)
    prefill = [(r, p) for r, p in zip(reports, patches) if r.sites and all(s.q_len != 1 for s in r.sites)]
    decode = [(r, p) for r, p in zip(reports, patches) if r.sites and all(s.q_len == 1 for s in r.sites)]
    assert prefill and decode and len(prefill) + len(decode) == len(reports)
    assert any(r.rewritten for r, _ in prefill) or cache == "static", [r.format() for r, _ in prefill]
    if cache == "dynamic":
        assert all(s.kv_cat for r in reports for s in r.sites)
        for r, p in prefill + decode:
            assert p["triton.cudagraphs"] is False and "keys come from torch.cat" in r.format()
        return
    assert all(p["triton.cudagraphs"] is True and not r.notes for r, p in decode)
    for r, p in prefill:
        assert p["triton.cudagraphs"] is prefill_cudagraphs
        assert bool(r.notes) is not prefill_cudagraphs
        assert ("CUDA graphs off for this graph (attention query length symbolic" in r.format()) is not prefill_cudagraphs

"""KV-cache compression (``kv_budget``) end to end on tiny HF models through generate(): a budget
covering the prompt is dense generation, a small one matches an eager reference that compresses the
same cache with a dense float64 SnapKV, per row in a left-padded batch; caches written in place
(StaticCache) and graphs without a cache stay full and say why; bad options fail when the backend is
built."""

from __future__ import annotations

import inspect
import operator

import pytest
import torch
from transformers import DynamicCache

import mif_compile
from mif_compile import BackendConfig, ConfigError, HeadPattern
from tests.backend.models import MODELS, use_reference_snapkv

FULL = HeadPattern.vertical_slash(v=4096, s=4096)  # covers every key at these lengths
VS = HeadPattern.vertical_slash(40, 120)
BUDGET = 96


def _options(**kw):
    return {"min_seq_len": 0, "inductor": False, "max_density": 1.0, "impl": "reference", "kv_budget": BUDGET, **kw}


def _compiled(arch="llama", dynamic=None, **kw):
    model = MODELS[arch]()
    model.forward = torch.compile(model.forward, backend="minference", options=_options(**kw), dynamic=dynamic)
    return model


def _ids(batch=1, n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, n), generator=g)


def _cache_kw(model, cache) -> dict:
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _generate(model, ids, cache=None, **kw):
    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=kw.pop("max_new_tokens", 4), do_sample=False, **_cache_kw(model, cache),
                             **kw)
    return out, cache


def _reference(arch, ids, cfg: BackendConfig, **kw):
    """generate() of the eager reference that compresses its cache with the float64 SnapKV oracle."""
    model = MODELS[arch]()
    cache = DynamicCache(config=model.config)
    kept = use_reference_snapkv(model, cfg, cache)
    out, cache = _generate(model, ids, cache, **kw)
    return out, cache, dict(kept)


def _kv_lines(reports) -> list[str]:
    return [s.kv for r in reports for s in r.sites if s.kv]


def test_budget_covering_the_prompt_equals_dense_generation():
    """Default torch.compile (automatic dynamic: a static graph, then a symbolic one), two prompt lengths."""
    dense = MODELS["llama"]()
    model = _compiled(default_pattern=FULL, kv_budget=512)
    for n in (200, 260):
        ids = _ids(n=n, seed=n)
        ref, ref_cache = _generate(dense, ids)
        out, cache = _generate(model, ids)
        assert torch.equal(out, ref)
        assert [layer.keys.shape[2] for layer in cache.layers] == [n + 3] * 2
        torch.testing.assert_close(cache.layers[1].keys, ref_cache.layers[1].keys, atol=2e-5, rtol=2e-5)
    compressed = [s for r in mif_compile.reports() for s in r.sites if s.kv_compressed]
    assert len(compressed) >= 4, "\n".join(r.format() for r in mif_compile.reports())  # both prefill graphs


@pytest.mark.parametrize("arch", list(MODELS))
def test_small_budget_matches_the_reference_compression(arch):
    ids = _ids(n=300)
    model = _compiled(arch, default_pattern=VS)
    out, cache = _generate(model, ids)
    cfg = BackendConfig(default_pattern=VS, min_seq_len=0, max_density=1.0, kv_budget=BUDGET)
    ref, ref_cache, kept = _reference(arch, ids, cfg)
    assert torch.equal(out, ref)
    layers = model.config.num_hidden_layers
    assert sorted(kept) == list(range(layers))
    assert [layer.keys.shape[2] for layer in cache.layers] == [BUDGET + 3] * layers  # + the decoded tokens
    for a, b in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(a.values, b.values, atol=2e-5, rtol=2e-5)
    report = mif_compile.reports()
    assert all("compressed to min(N, 96)" in line for line in _kv_lines(report)) and _kv_lines(report)
    runs = [r for rep in report for r in rep.runs if r.last_kv]
    assert [r.last_kv for r in runs] == [(300, BUDGET)] * layers


def test_dense_run_on_cpu_auto_compresses_with_its_own_scores():
    """impl='auto' on CPU runs dense SDPA: the votes come from the estimation kernel called for them."""
    ids = _ids(n=300, seed=3)
    model = _compiled(impl="auto", kv_window=32, kv_pool=5)
    out, cache = _generate(model, ids)
    cfg = BackendConfig(default_pattern=HeadPattern("dense"), min_seq_len=0, kv_budget=BUDGET, kv_window=32, kv_pool=5)
    ref, ref_cache, _ = _reference("llama", ids, cfg)
    assert torch.equal(out, ref)
    for a, b in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=2e-5, rtol=2e-5)


def test_left_padded_batch_selects_per_row():
    ids = _ids(batch=2, n=300, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    model = _compiled(default_pattern=VS)
    out, cache = _generate(model, ids, attention_mask=mask)
    cfg = BackendConfig(default_pattern=VS, min_seq_len=0, max_density=1.0, kv_budget=BUDGET)
    ref, ref_cache, kept = _reference("llama", ids, cfg, attention_mask=mask)
    assert torch.equal(out, ref)
    assert [layer.keys.shape[2] for layer in cache.layers] == [BUDGET + 40 + 3] * 2
    for a, b in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=2e-5, rtol=2e-5)
    for idx in kept.values():  # [B, Hkv, K]: pads in the first slots, real keys after, per row
        assert not bool((idx[0] < 40).all(-1).any()) and idx.shape[-1] == BUDGET + 40
        assert torch.equal(idx[1, :, :40], torch.arange(40).expand(2, 40))
        assert bool((idx[1, :, 40:] >= 40).all())
        assert not torch.equal(idx[0], idx[1])


def _assert_matches_padded_reference(out, cache, ids, mask):
    """Tokens and cache equal the eager float64-SnapKV reference on the 1-layer Llama, row 0 padded by 25."""
    ref_model = MODELS["llama"](num_hidden_layers=1)
    ref_cache = DynamicCache(config=ref_model.config)
    use_reference_snapkv(ref_model, BackendConfig(default_pattern=VS, min_seq_len=0, max_density=1.0, kv_budget=BUDGET),
                         ref_cache)
    ref, ref_cache = _generate(ref_model, ids, ref_cache, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(out, ref)
    assert cache.layers[0].keys.shape[2] == BUDGET + 25 + 2
    torch.testing.assert_close(cache.layers[0].keys, ref_cache.layers[0].keys, atol=1e-4, rtol=1e-4)


def test_inductor_left_padded_batch():
    """Through Inductor: with padding the kept length is data-dependent (an unbacked size)."""
    ids = _ids(batch=2, n=260, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :25] = 0
    model = MODELS["llama"](num_hidden_layers=1)
    model.forward = torch.compile(model.forward, backend=mif_compile.backend(
        min_seq_len=0, max_density=1.0, impl="reference", default_pattern=VS, kv_budget=BUDGET), dynamic=True)
    out, cache = _generate(model, ids, attention_mask=mask, max_new_tokens=3)
    _assert_matches_padded_reference(out, cache, ids, mask)


def test_right_padding_is_refused():
    ids = _ids(batch=2, n=300, seed=9)
    mask = torch.ones_like(ids)
    mask[1, -30:] = 0
    model = _compiled(default_pattern=VS)
    with pytest.raises(ValueError, match=r"kv_budget=96: batch row 1 has a pad after a real token \(right padding\?\)"):
        _generate(model, ids, attention_mask=mask)


def test_static_cache_stays_full_and_says_why():
    ids = _ids(n=200)
    dense = MODELS["llama"]()
    with torch.no_grad():
        ref = dense.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        model = _compiled(default_pattern=FULL)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)
    sites = [s for r in mif_compile.reports() for s in r.sites]
    assert not any(s.kv_compressed for s in sites)
    lines = _kv_lines(mif_compile.reports())
    assert lines and all("cache not compressed" in line and "StaticCache" in line for line in lines), lines


def test_no_cache_and_grad_mode_are_not_compressed():
    model = MODELS["llama"]()
    ids = _ids(n=200)
    comp = torch.compile(model, backend="minference", options=_options(default_pattern=FULL))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = comp(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert all("no cache, use_cache=False" in line for line in _kv_lines([mif_compile.last_report()]))
    torch._dynamo.reset()
    cache = DynamicCache(config=model.config)
    comp(ids, use_cache=True, **_cache_kw(model, cache))  # grad mode on
    assert cache.layers[0].keys.shape[2] == 200
    lines = _kv_lines([mif_compile.last_report()])
    assert lines and all("grad mode is on" in line for line in lines), lines


def test_the_graph_stores_the_kept_kv_not_the_full_cache():
    """The prefill graph returns the op's kept k/v where it returned the cache's torch.cat results, so
    each layer's full k/v die with the layer (peak memory: one layer's full k/v beyond the kept cache)."""
    graphs = []
    inner = mif_compile.backend(**_options(default_pattern=VS))

    def spy(gm, example_inputs, **kw):
        fn = inner(gm, example_inputs, **kw)
        graphs.append(gm)
        return fn

    model = MODELS["llama"]()
    model.forward = torch.compile(model.forward, backend=spy)
    _generate(model, _ids(n=200), max_new_tokens=2)
    prefill = graphs[0]
    outs = [n for n in prefill.graph.nodes if n.op == "output"][0].args[0]
    ops = [n for n in prefill.graph.nodes if n.target is torch.ops.mif.sparse_attention_snapkv.default]
    assert len(ops) == 2
    kept = [o for o in outs if o.target is operator.getitem and o.args[0] in ops]
    assert sorted(o.args[1] for o in kept) == [1, 1, 2, 2]
    assert not any(o.target in (torch.cat, torch.ops.aten.cat.default) for o in outs if hasattr(o, "target"))


@pytest.mark.parametrize("options, message", [
    ({"kv_budget": 0}, "kv_budget=0: must be a positive integer or None"),
    ({"kv_budget": 4.5}, "kv_budget=4.5: must be a positive integer"),
    ({"kv_budget": True}, "kv_budget=True: must be a positive integer"),
    ({"kv_budget": 4096, "kv_window": 128}, "kv_window=128: larger than the estimation probe last_q=64"),
    ({"kv_budget": 4096, "kv_window": 0}, "kv_window=0: must be a positive integer"),
    ({"kv_budget": 32}, r"kv_budget=32: smaller than the observation window \(kv_window=64, the default: last_q\)"),
    ({"kv_budget": 4096, "kv_pool": 4}, "kv_pool=4: must be odd"),
    ({"kv_budget": 4096, "kv_pool": -1}, "kv_pool=-1: must be a positive integer"),
    ({"kv_window": 16}, "kv_window=16: has no effect without kv_budget"),
])
def test_bad_options_fail_when_the_backend_is_built(options, message):
    with pytest.raises(ConfigError, match=message):
        mif_compile.backend(**options)
    model = torch.compile(MODELS["llama"](), backend="minference", options=options)
    with pytest.raises(ConfigError, match=message), torch.no_grad():  # the same text at the first call
        model(_ids(n=16))


def test_padded_compression_runs_without_inductor_on_old_torch(monkeypatch):
    """torch < 2.13: Inductor fails on the padded graph's data-dependent cache length and on the decode graphs
    after it, so those graphs run their ops as they are, with a note in the report; the tokens and the cache
    stay the reference's."""
    import importlib

    B = importlib.import_module("mif_compile.backend")
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    ids = _ids(batch=2, n=260, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :25] = 0
    model = MODELS["llama"](num_hidden_layers=1)
    be = mif_compile.backend(min_seq_len=0, max_density=1.0, impl="reference", default_pattern=VS, kv_budget=BUDGET)
    model.forward = torch.compile(model.forward, backend=be, dynamic=True)
    out, cache = _generate(model, ids, attention_mask=mask, max_new_tokens=3)
    notes = [n for r in mif_compile.reports() for n in r.notes if "without Inductor" in n]
    assert notes and "2.11.0" in notes[0]
    _assert_matches_padded_reference(out, cache, ids, mask)
    assert not B._kv_needs_eager(torch.fx.symbolic_trace(torch.nn.Identity()), [])

"""CPU checks of the structured-attention benchmark inputs (benchmarks/structured*.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import structured as S  # noqa: E402

N = 4096


@pytest.fixture(scope="module")
def mixes():
    out = {}
    for mix in S.ALL_MIXES:
        q, k, v, st = S.structured_qkv(mix, heads=2, kv_heads=1, seq_len=N, dtype=torch.float32, seed=3,
                                       return_structure=True)
        out[mix] = (q, k, st, S.keys_for_mass(q, k, rows=16).float())
    return out


def test_keys_for_mass_counts_uniform_rows():
    q = torch.zeros(1, 1, 1000, 8)  # every score 0: row i spreads its mass evenly over keys 0..i
    k = torch.randn(1, 1, 1000, 8)
    rows = S.sample_rows(1000, 8)
    got = S.keys_for_mass(q, k, frac=0.5, rows=8)[0, 0]
    want = torch.ceil(0.5 * (rows + 1) - 1e-3).long()  # float32 cumsum: within one key of exact
    assert (got - want).abs().max() <= 1, (got, want)


@pytest.mark.parametrize("mix,main", [("local", "local"), ("slash", "slash"), ("vertical", "vertical")])
def test_heavy_mixes_put_most_mass_where_named(mixes, mix, main):
    q, k, st, kfm = mixes[mix]
    prof = S.mass_profile(q, k, st, rows=16)
    assert abs(sum(prof.values()) - 1) < 1e-4
    assert max(prof, key=prof.get) == main, prof
    assert prof["noise"] < 0.15, prof
    assert 5 <= kfm.median() <= N / 5, kfm


def test_mixed_has_every_component(mixes):
    q, k, st, kfm = mixes["mixed"]
    prof = S.mass_profile(q, k, st, rows=16)
    for c in ("sink", "vertical", "local", "slash"):
        assert prof[c] > 0.05, prof
    assert prof["noise"] < 0.1, prof
    assert kfm.median() <= N / 10, kfm


def test_random_has_no_structure(mixes):
    assert mixes["random"][3].median() > N / 4  # most of a second-half row holds 95% of its mass


def test_deterministic_by_seed():
    a = S.structured_qkv("mixed", heads=2, kv_heads=1, seq_len=1024, seed=5)
    b = S.structured_qkv("mixed", heads=2, kv_heads=1, seq_len=1024, seed=5)
    c = S.structured_qkv("mixed", heads=2, kv_heads=1, seq_len=1024, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="mix"):
        S.structured_qkv("diagonal", seq_len=4096)
    with pytest.raises(ValueError, match="kv_heads"):
        S.structured_qkv("mixed", heads=3, kv_heads=2, seq_len=4096)
    with pytest.raises(ValueError, match="too short"):
        S.structured_qkv("mixed", seq_len=512)


def test_structured_llama_layers_have_few_keys():
    from transformers import LlamaConfig, LlamaForCausalLM
    from structured_model import capture_qk, structure_llama, structured_ids

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1 << 14, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    n = 1024
    ids = torch.randint(0, 1000, (1, n))
    before = [S.keys_for_mass(q, k, rows=8).float().median() for q, k in capture_qk(model, ids)]
    info = structure_llama(model, mix="mixed", seed=0, ref_len=n, centre=n // 2)
    ids = structured_ids(n, info, 1000, seed=0)
    assert ids[0, 0] == info["sink_id"]
    after = [S.keys_for_mass(q, k, rows=8).float() for q, k in capture_qk(model, ids)]
    for layer, (b, a) in enumerate(zip(before, after)):
        assert b > n / 4, (layer, b)  # random weights: no structure
        assert a.median() <= n / 6 and a.max() <= n / 3, (layer, a)
    with torch.no_grad():
        assert torch.isfinite(model(ids, logits_to_keep=1).logits).all()


def test_bench_structured_quick_runs_on_cpu(tmp_path):
    import bench_structured

    rows = bench_structured.main(["--quick", "--lengths", "2048", "--mixes", "mixed", "--out", str(tmp_path)])
    assert (tmp_path / "bench_structured.json").exists()
    assert [(r["mix"], r["mode"]) for r in rows] == [("mixed", "fixed")]
    mixed = rows[0]
    assert not mixed["fell_back_to_dense"] and 0 < mixed["density"] < 0.9, mixed  # --quick: max_density 1
    assert mixed["err_ref"] < 0.05 and mixed["err_dense_ref"] < 1e-4, mixed
    assert mixed["keys95_median"] < 2048 / 4
    assert 0 < mixed["index_ms"] and mixed["ours_ms"] > 0  # the index alone is timed apart


def test_bench_structured_block_m_modes(tmp_path):
    """--block-m 64 128: every mode at each query block (named MODE@bm64), all measured against the
    fixed budgets at block_m 128; the index at 64 is the same choice of keys cut into smaller query
    blocks, so it keeps fewer pairs."""
    import bench_structured

    rows = bench_structured.main(["--quick", "--lengths", "2048", "--mixes", "mixed", "--mass", "1.0",
                                  "--block-m", "64", "128", "--out", str(tmp_path)])
    by = {r["mode"]: r for r in rows}
    assert list(by) == ["fixed", "mass1", "fixed@bm64", "mass1@bm64"]
    assert [r["block_m"] for r in rows] == [128, 128, 64, 64]
    for name in ("fixed", "mass1"):
        small, big = by[name + "@bm64"], by[name]
        assert small["density"] < big["density"], (small["density"], big["density"])
        assert small["err_ref"] < 0.05
        assert small["vs_fixed"] == by["fixed"]["ours_ms"] / small["ours_ms"]

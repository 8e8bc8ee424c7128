"""The adaptive (mass-targeted) index through the op and the backend, on attention with structure.

Random q/k have no structure (every key holds about the same mass), so these tests build q/k the
way RoPE makes real attention position-dependent: q_i = R(i) a + noise, k_j = R(j) b + noise gives
scores that depend on i - j (a local window and one distant diagonal), plus a sink and a heavy key.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import mif_compile
from mif_compile import HeadPattern, ops
from mif_compile.testing import rel_err


QA, KA = 6.0, 2.0


def structured_qk(B, H, Hkv, N, D, *, slash=700, heavy=(333,), seed=0):
    g = torch.Generator().manual_seed(seed)
    half = D // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)  # [half]
    theta[-1] = 0.0  # the last pair is not rotated (as in partial RoPE): sink and heavy keys live there
    pos = torch.arange(N, dtype=torch.float64)[:, None] * theta  # [N, half]

    def rot(x, p):  # x: [..., N, D] as (real, imag) halves, rotated by angle p
        xr, xi = x[..., :half], x[..., half:]
        c, s = torch.cos(p), torch.sin(p)
        return torch.cat([xr * c - xi * s, xr * s + xi * c], -1)

    amp = torch.zeros(half, dtype=torch.float64)
    amp[: half // 2] = 1.0  # high-frequency pairs: a sharp peak at offset 0 (a local window)
    a = torch.cat([amp, torch.zeros(half, dtype=torch.float64)])
    # a distant diagonal: the query is rotated back by `slash`, so its score peaks at i - j = slash
    a_slash = rot(a.expand(N, D), -torch.full((N, 1), float(slash), dtype=torch.float64) * theta)
    q = torch.zeros(B, H, N, D, dtype=torch.float64)
    for h in range(H):
        base = a.expand(N, D) if h % 2 == 0 else a_slash
        q[:, h] = rot(base, pos) * QA
    k = rot(a.expand(B, Hkv, N, D), pos) * KA
    # sink and heavy keys: along the unrotated pair, which every query shares
    q[..., half - 1] += 2.0
    k[:, :, 0, half - 1] += 46.0
    for j in heavy:
        k[:, :, j, half - 1] += 44.0
    q = q + 0.3 * torch.randn(q.shape, generator=g, dtype=torch.float64)
    k = k + 0.3 * torch.randn(k.shape, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    return q.float(), k.float(), v.float()


def _run(q, k, v, mass, budget=(100, 600), block_m=64):
    codes, b0, b1 = ops.encode_heads([HeadPattern.vertical_slash(*budget)] * q.shape[1])
    m = [mass] * q.shape[1] if isinstance(mass, float) else None  # "fixed" or None: fixed budgets
    with ops.collect_stats() as st:
        out = ops.run_layer(q, k, v, None, q.shape[-1] ** -0.5, codes, b0, b1, 0, 64, block_m, "reference", 1.0, m)
    return out, st[0]["density"]


def test_adaptive_keeps_the_pairs_the_mass_needs():
    q, k, v = structured_qk(1, 4, 2, 3000, 32)
    dense = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                           v.double().repeat_interleave(2, 1), is_causal=True)
    fixed, d_fixed = _run(q, k, v, None)
    adaptive, d_adapt = _run(q, k, v, 0.95)
    looser, d_loose = _run(q, k, v, 0.5)
    # at 3K tokens the fixed budgets (100 columns, 600 diagonals) keep almost every pair; the adaptive
    # index keeps what the estimated mass needs, and less mass costs fewer pairs and gives more error
    assert d_adapt < 0.3 * d_fixed, (d_adapt, d_fixed)
    assert d_loose <= d_adapt
    e_adapt, e_loose = rel_err(adaptive, dense), rel_err(looser, dense)
    assert e_adapt < 0.1 and e_loose > e_adapt, (e_adapt, e_loose, rel_err(fixed, dense))


def test_full_caps_and_mass_one_equal_dense():
    q, k, v = structured_qk(2, 4, 2, 700, 16, slash=300, heavy=(100,))
    n = q.shape[2]
    out, _ = _run(q, k, v, 1.0, budget=(n, n))
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_mixed_fixed_and_adaptive_heads_in_one_layer():
    q, k, v = structured_qk(1, 4, 2, 1500, 16)
    heads = [HeadPattern.vertical_slash(100, 600), HeadPattern.vertical_slash(100, 600, mass=0.9),
             HeadPattern.a_shape(16, 256), HeadPattern.vertical_slash(200, 800, mass=0.99)]
    codes, b0, b1 = ops.encode_heads(heads)
    mass = ops.encode_mass(heads)
    assert mass == [0.0, 0.9, 0.0, 0.99]
    scale = 16 ** -0.5
    idx = ops.build_layer_index(q, k, None, scale, codes, b0, b1, 64, 64, "reference", mass=mass)
    for h, hp in enumerate(heads):  # each head's index is the one its own single-head plan gives
        c1, a1, z1 = ops.encode_heads([hp])
        alone = ops.build_layer_index(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], None, scale, c1, a1, z1, 64, 64,
                                      "reference", mass=ops.encode_mass([hp]))
        n = int(alone.block_count.max())
        assert torch.equal(idx.block_count[:, h], alone.block_count[:, 0])
        assert torch.equal(idx.block_offset[:, h, :, :n], alone.block_offset[:, 0, :, :n])
        assert torch.equal(idx.column_count[:, h], alone.column_count[:, 0])


@pytest.mark.parametrize("mass", ["default", "fixed", 0.95])
def test_backend_setting_and_report(mass):
    q, k, v = structured_qk(1, 4, 2, 1200, 16)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    setting = {} if mass == "default" else {"mass": mass}  # not given: the backend's default, mass=1.0
    compiled = torch.compile(attn, backend=mif_compile.backend(
        min_seq_len=0, impl="reference", max_density=1.0, inductor=False,
        default_pattern=HeadPattern.vertical_slash(100, 600), **setting))
    out = compiled(q, k, v)
    text = str(mif_compile.last_report())
    used = {"default": 1.0, "fixed": "fixed", 0.95: 0.95}[mass]
    shown = {"default": "mass=1)", "fixed": "mass=fixed)", 0.95: "mass=0.95)"}[mass]
    assert shown in text and ("fixed budgets" in text) == (mass == "fixed"), text
    expect, _ = _run(q, k, v, used, block_m=128)  # the backend's default block_m
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_plan_mass_round_trips_and_validates(tmp_path):
    plan = mif_compile.ModelPlan(layers=((HeadPattern.vertical_slash(30, 800, mass=0.9), HeadPattern.dense()),))
    path = tmp_path / "plan.json"
    mif_compile.save_plan(plan, path)
    assert mif_compile.load_plan(path) == plan
    with pytest.raises(mif_compile.ConfigError, match="MInference's format has no mass"):
        plan.to_minference_json()
    with pytest.raises(mif_compile.ConfigError, match=r"mass must be a number in \(0, 1\]"):
        HeadPattern.vertical_slash(mass=1.5)
    with pytest.raises(mif_compile.ConfigError, match="vertical_slash heads only"):
        HeadPattern("a_shape", (4, 64), mass=0.9)
    with pytest.raises(mif_compile.ConfigError, match="mass"):
        mif_compile.backend(mass=0.0)
    # None is no setting: the default is the adaptive index, and fixed budgets are asked for by name
    with pytest.raises(mif_compile.ConfigError, match=r"mass=None: .*'fixed' \(MInference's fixed budgets\)"):
        mif_compile.backend(mass=None)
    with pytest.raises(mif_compile.ConfigError, match="mass='fixd'"):
        mif_compile.backend(mass="fixd")
    assert mif_compile.BackendConfig().mass == 1.0 and mif_compile.BackendConfig(mass="Fixed").mass == "fixed"
    assert HeadPattern.vertical_slash(mass="FIXED").fixed and not HeadPattern.vertical_slash(mass="fixed").adaptive


def test_a_minference_plan_runs_its_fixed_budgets_under_the_default_mass(tmp_path):
    """The backend's default is the adaptive index; a MInference plan file means fixed budgets, and runs
    them: the same output as mass="fixed", and the report says fixed budgets."""
    q, k, v = structured_qk(1, 4, 2, 1200, 16)
    path = tmp_path / "mi.json"
    path.write_text('[{"0": ["vertical_and_slash", 100, 600, 0.9], "1": ["vertical_and_slash", 100, 600, 0.9], '
                    '"2": ["vertical_and_slash", 100, 600, 0.9], "3": ["vertical_and_slash", 100, 600, 0.9]}]')

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    class Model(torch.nn.Module):  # a per-layer plan needs the layer index: the site sits in layers.0
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Attn()])

        def forward(self, q, k, v):
            return self.layers[0](q, k, v)

    attn = Model()
    outs = {}
    for name, extra in (("plan", {"config": str(path)}), ("default", {}), ("fixed", {"mass": "fixed"})):
        torch._dynamo.reset()
        pattern = {} if extra.get("config") else {"default_pattern": HeadPattern.vertical_slash(100, 600)}
        compiled = torch.compile(attn, backend=mif_compile.backend(
            min_seq_len=0, impl="reference", max_density=1.0, inductor=False, **pattern, **extra))
        outs[name] = compiled(q, k, v)
        if name == "plan":
            text = str(mif_compile.last_report())
            assert "4 x vertical_slash(v=100, s=600, mass=fixed); vertical-slash: fixed budgets" in text, text
    assert torch.equal(outs["plan"], outs["fixed"])
    assert not torch.equal(outs["default"], outs["fixed"])  # the default really is another index here

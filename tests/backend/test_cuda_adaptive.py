"""GPU: the adaptive index through the Triton path (estimation, selection, index kernel, attention)."""

import pytest
import torch

from mif_compile import HeadPattern, kernels as K, ops
from mif_compile.testing import assert_close_to_ref64

pytestmark = pytest.mark.cuda


def _inputs(n, seed=0):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_adaptive import rope_structured

    return rope_structured(n, heads=4, kv_heads=2, seed=seed, device="cuda")


@pytest.mark.parametrize("n", [4096, 20000])
def test_index_kernel_equals_reference_on_adaptive_choice(n):
    q, k, v = _inputs(n)
    col, diag = K.vertical_slash_scores(q, k, last_q=64, scale=128 ** -0.5)
    v_idx, s_off, share = K.vertical_slash_select(col, diag, 1000, 6096, 0.95, last_q=64, v_max=1000, s_max=6096)
    assert bool((share >= 0.95 * (1 - 1e-6)).all())
    sink = torch.zeros(4, dtype=torch.int64, device="cuda")
    from mif_compile.kernels.select import adaptive_cap_s, slash_group_count

    cap = adaptive_cap_s(slash_group_count(6096), 128)
    a = K.build_vs_index(v_idx, s_off, sink, seq_len=n, block_m=128, cap_s=cap, cap_v=1000, impl="triton")
    b = K.build_vs_index(v_idx, s_off, sink, seq_len=n, block_m=128, cap_s=cap, cap_v=1000, impl="reference")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_op_triton_equals_reference_on_the_same_index():
    n = 20000
    q, k, v = _inputs(n, seed=3)
    heads = [HeadPattern.vertical_slash(mass=0.95)] * 4
    codes, b0, b1 = ops.encode_heads(heads)
    idx = ops.build_layer_index(q, k, None, 128 ** -0.5, codes, b0, b1, 64, 128, "triton", mass=ops.encode_mass(heads))
    out = K.sparse_attention(q, k, v, idx, scale=128 ** -0.5, block_m=128, impl="triton")
    ref64 = K.sparse_attention(q.double(), k.double(), v.double(), idx, scale=128 ** -0.5, block_m=128, impl="reference")
    pt = K.sparse_attention(q, k, v, idx, scale=128 ** -0.5, block_m=128, impl="reference")
    assert_close_to_ref64(out, pt, ref64)
    assert float(ops.kept_density(idx, n, 128)) < 0.2


def test_selection_on_the_gpu_equals_the_cpu():
    """The selection is one torch code path on both devices (its scans in float64 chunks, kernels/select.py):
    on the GPU's own scores at 128K it keeps the CPU's columns and groups, and the same share."""
    n = 131072
    q, k, _ = _inputs(n, seed=5)
    col, diag = K.vertical_slash_scores(q, k, last_q=64, scale=128 ** -0.5)
    args = dict(last_q=64, v_max=1000, s_max=6096)
    gpu = K.vertical_slash_select(col, diag, 1000, 6096, 0.99, **args)
    cpu = K.vertical_slash_select(col.cpu(), diag.cpu(), 1000, 6096, 0.99, **args)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=0, atol=1e-4)
    for a, b in zip(gpu[:2], cpu[:2]):
        for h in range(a.shape[1]):
            sa, sb = set(a[0, h].cpu().tolist()) - {-1}, set(b[0, h].tolist()) - {-1}
            assert len(sa ^ sb) <= 0.01 * max(1, len(sa | sb)), (h, len(sa ^ sb), len(sa | sb))


@pytest.mark.parametrize("n", [131072, 20000])
def test_index_kernels_on_the_gpu_equal_their_torch_twins(n, monkeypatch):
    """The selection's two kernels and the index prologue's one, compiled on the GPU at the op's caps (1000
    columns + 96 groups: the keep kernel sorts 2048 candidates), against their torch twins on the same GPU
    tensors: the same columns, offsets and runs, the share within an ulp, and no kernel fell back."""
    from mif_compile.kernels import fallback, index, select

    monkeypatch.setattr(fallback, "_FAILED", {})
    q, k, _ = _inputs(n, seed=7)
    col, diag = K.vertical_slash_scores(q, k, last_q=64, scale=128 ** -0.5)
    args = (col, diag, torch.tensor([1000] * 4), torch.tensor([6096, 6096, 3000, 100]),
            torch.tensor([0.99, 1.0, 0.9, 0.95]))
    kw = dict(last_q=64, v_max=1000, s_max=6096, sink_start=torch.tensor([5], device="cuda"),
              probe_end=torch.tensor([n - 100], device="cuda"))
    got = select.vertical_slash_select(*args, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(select, "column_scores", select.column_scores_reference)
        mp.setattr(select, "keep_candidates", select.keep_candidates_reference)
        want = select.vertical_slash_select(*args, **kw)
    assert fallback.failures() == {}
    for name, a, b in zip(("v_idx", "s_off"), got[:2], want[:2]):
        assert torch.equal(a, b), _differences(name, a, b)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=2.5e-7)
    o = got[1].sort(-1, descending=True).values
    for i, (a, b) in enumerate(zip(index.vs_runs(o, got[0], block_m=128),
                                   index.vs_runs_reference(o, got[0], block_m=128))):
        assert torch.equal(a, b), _differences(f"vs_runs output {i}", a, b)
    assert fallback.failures() == {}


def _differences(name, a, b):
    # per head (batch 0; [B, H, ...] or the counts' [B, H]): how many entries differ and the first few
    # (kernel, twin) pairs, for the failure message
    if a.shape != b.shape:
        return f"{name}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    rows = []
    for h in range(a.shape[1]):
        x, y = a[0, h].reshape(-1), b[0, h].reshape(-1)
        d = (x != y).nonzero().flatten()
        if len(d):
            pairs = [(int(i), x[i].item(), y[i].item()) for i in d[:4].tolist()]
            rows.append(f"head {h}: {len(d)} of {x.numel()} differ, e.g. (at, kernel, twin) {pairs}")
    return f"{name}: " + "; ".join(rows)

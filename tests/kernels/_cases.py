"""Shared hypothesis strategies and helpers: random indexes and masked dense attention in float64."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

import mif_compile.kernels as K


@st.composite
def vs_case(draw, max_n: int = 300, max_heads: int = 8):
    """A random vertical-slash / a-shape / dense layer: shapes, budgets, index inputs."""
    hkv = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 4]))
    H = hkv * ratio
    if H > max_heads:
        hkv, H = 1, ratio
    case = dict(
        B=draw(st.integers(1, 2)), H=H, Hkv=hkv,
        D=draw(st.sampled_from([16, 32, 64])),
        N=draw(st.integers(1, max_n)),
        block_m=draw(st.sampled_from([64, 128])),
        V=draw(st.integers(1, 40)), S=draw(st.integers(1, 40)),
        sink=draw(st.sampled_from(["none", "small", "dense", "mixed"])),
        padding=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        left=draw(st.sampled_from([0, 0, 1, 63, 100, max_n])),  # rows' first real key up to this (left padding)
    )
    return case


def make_inputs(c, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, N, D = c["B"], c["H"], c["Hkv"], c["N"], c["D"]
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    v_idx = torch.randint(-1, N, (B, H, c["V"]), generator=g, dtype=torch.int32)
    s_off = torch.randint(-1, N, (B, H, c["S"]), generator=g, dtype=torch.int32)
    s_off[..., 0] = 0  # the main diagonal, as the estimation always forces it
    sink = {
        "none": torch.zeros(H, dtype=torch.int64),
        "small": torch.randint(1, 100, (H,), generator=g),
        "dense": torch.full((H,), N, dtype=torch.int64),
        "mixed": torch.tensor([(0, 17, N)[h % 3] for h in range(H)]),
    }[c["sink"]]
    pad = None
    if c["padding"]:
        pad = torch.rand(B, N, generator=g) > 0.3
    to = lambda t: t.to(device)  # noqa: E731
    left = c.get("left", 0)
    start = torch.randint(0, min(left, N) + 1, (B,), generator=g, dtype=torch.int32) if left else None
    return dict(q=to(q.to(dtype)), k=to(k.to(dtype)), v=to(v.to(dtype)), v_idx=to(v_idx), s_off=to(s_off),
                n_sink=to(sink), key_padding=None if pad is None else to(pad),
                sink_start=None if start is None else to(start))


def probe_end(c, cut):
    """int32 [B] probe ends: row 0 ends ``cut`` keys early (right padding), the others at N; None for None."""
    if cut is None:
        return None
    end = torch.full((c["B"],), c["N"], dtype=torch.int32)
    end[0] = max(1, c["N"] - cut)
    return end


def build(c, x, impl="reference"):
    return K.build_vs_index(x["v_idx"], x["s_off"], x["n_sink"], seq_len=c["N"], block_m=c["block_m"],
                            cap_s=K.max_blocks_per_row(c["N"]), cap_v=c["V"], impl=impl,
                            sink_start=x.get("sink_start"))


def dense_masked(q, k, v, mask, scale):
    """Attention under a bool [B, H, N, N] mask, in float64; empty rows give 0."""
    H = q.shape[1]
    g = H // k.shape[1]
    kx = k.double().repeat_interleave(g, 1)
    vx = v.double().repeat_interleave(g, 1)
    s = (q.double() @ kx.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p @ vx


def full_mask(index, c, key_padding):
    mask = K.index_to_dense_mask(index, c["N"], c["block_m"])
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :].to(mask.device)
    return mask


def low_precision_pt(q, k, v, mask, scale):
    """What plain PyTorch gets in q's dtype: scores and p rounded to it, fp32 softmax."""
    H = q.shape[1]
    g = H // k.shape[1]
    kx = k.repeat_interleave(g, 1).float()
    vx = v.repeat_interleave(g, 1).float()
    s = (q.float() @ kx.transpose(-1, -2)).to(q.dtype).float() * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0).to(q.dtype).float()
    return (p @ vx).to(q.dtype)


def nm(c):
    return math.ceil(c["N"] / c["block_m"])

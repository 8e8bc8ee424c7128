"""A tiny attention-only model whose heads have planted attention shapes, for the search tests.

Each head's q and k are fixed functions of the position (buffers), so its attention has a known
shape whatever the input; v and the residual stream come from the tokens. Every layer calls
``F.scaled_dot_product_attention(is_causal=True)`` inside ``layers.<i>``, so the backend rewrites
it and the search captures it like a real model's.

Shapes (logits after the 1/sqrt(D) scale):
- ``a_shape``: the first ``SINK`` keys, plus the key's 128-token bucket being the query's or the one
  before (a local window 128..255 wide): inside A-shape(64, 256).
- ``vertical``: a few fixed key columns (special tokens), one per 64-block, far apart.
- ``slash``: fixed relative offsets (i - j in SLASHES), as a sum of cosines of the distance
  (a Dirichlet kernel, D/2 frequencies, so each line is a few tokens thick).
- ``block``: 64-token blocks grouped in clusters of 3 scattered blocks; a query attends the blocks
  of its own cluster.
- ``rope``: attention made position-dependent the way RoPE makes it in real models (rotated q and k,
  the query rotated back by ``ROPE_SLASH``): one distant diagonal a few tokens thick, a sink and a
  heavy key, plus noise. A fixed slash budget large enough to hold the diagonal spends the rest of
  its picks on scattered low-mass diagonals (2-3 key tiles each per query block); the adaptive
  index keeps the diagonal's group and stops (the case of issue 11).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

N = 2048
D = 128
SINK = 64
STRENGTH = 12.0
VERTICAL_COLS = (70, 333, 515, 700, 901, 1150, 1337, 1500, 1701, 1900)
SLASHES = (0, 180, 420, 700, 1000, 1300, 1600)
BUCKET = 128


def _a_shape(n, g):
    q = torch.zeros(n, D)
    k = torch.zeros(n, D)
    pos = torch.arange(n)
    k[:SINK, 0] = 1.0
    q[:, 0] = STRENGTH
    b = pos // BUCKET
    k[pos, 1 + b] = 1.0
    q[pos, 1 + b] = STRENGTH
    q[pos[b > 0], b[b > 0]] = STRENGTH  # 1 + (b - 1)
    return q, k


def _vertical(n, g):
    q = torch.zeros(n, D)
    k = torch.zeros(n, D)
    k[[c for c in VERTICAL_COLS if c < n], 0] = 1.0
    q[:, 0] = STRENGTH
    return q, k


def _slash(n, g, strength=30.0):
    f = torch.arange(1, D // 2 + 1, dtype=torch.float64)
    w = 2 * math.pi * f / n  # period n: no aliasing inside the sequence
    pos = torch.arange(n, dtype=torch.float64)
    q = torch.cat([torch.cos(pos[:, None] * w), torch.sin(pos[:, None] * w)], 1)
    k = torch.zeros(n, D, dtype=torch.float64)
    for o in SLASHES:  # cos(w (i - j - o)) = cos(wi) cos(w(j+o)) + sin(wi) sin(w(j+o))
        k += torch.cat([torch.cos((pos[:, None] + o) * w), torch.sin((pos[:, None] + o) * w)], 1)
    return (q * strength / f.numel()).float(), k.float()


def _block(n, g):
    nb = n // 64
    order = torch.randperm(nb - 1, generator=g) + 1  # block 0 is forced by block-sparse anyway
    cluster = torch.zeros(nb, dtype=torch.long)
    cluster[order] = torch.arange(nb - 1) // 3 + 1
    blk = torch.arange(n) // 64
    q = torch.zeros(n, D)
    k = torch.zeros(n, D)
    k[torch.arange(n), cluster[blk]] = 1.0
    q[torch.arange(n), cluster[blk]] = STRENGTH
    return q, k


ROPE_SLASH = 700
ROPE_HEAVY = 333


def _rope(n, g):
    half = D // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    theta[-1] = 0.0  # the last pair is not rotated: the sink and the heavy key live there
    ang = torch.arange(n, dtype=torch.float64)[:, None] * theta  # [n, half]

    def rot(x, a):  # x: [n, D] as (real, imag) halves, rotated by the angles a
        xr, xi = x[:, :half], x[:, half:]
        return torch.cat([xr * torch.cos(a) - xi * torch.sin(a), xr * torch.sin(a) + xi * torch.cos(a)], 1)

    base = torch.zeros(n, D, dtype=torch.float64)
    base[:, : half // 2] = 1.0  # high-frequency pairs: a sharp peak at one offset
    q = rot(rot(base, -ROPE_SLASH * theta.expand(n, half)), ang) * 6.0  # peaks at i - j = ROPE_SLASH
    k = rot(base, ang) * 2.0
    q[:, half - 1] += 2.0
    k[0, half - 1] += 46.0
    k[ROPE_HEAVY, half - 1] += 44.0
    q = q + 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64)
    k = k + 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return (q / math.sqrt(D)).float(), k.float()  # PlantedAttention scales q by sqrt(D) back


SHAPES = {"rope": _rope, "a_shape": _a_shape, "vertical": _vertical, "slash": _slash, "block": _block}
EXPECTED = {"rope": "vertical_slash", "a_shape": "a_shape", "vertical": "vertical_slash", "slash": "vertical_slash", "block": "block_sparse"}


class PlantedAttention(nn.Module):
    def __init__(self, kinds, dim: int, n: int, g: torch.Generator):
        super().__init__()
        qs, ks = zip(*(SHAPES[kind](n, g) for kind in kinds))
        noise = 0.05
        q = torch.stack(qs) * math.sqrt(D) + noise * torch.randn(len(kinds), n, D, generator=g)
        k = torch.stack(ks) + noise * torch.randn(len(kinds), n, D, generator=g)
        self.register_buffer("q", q[None])  # [1, H, N, D]
        self.register_buffer("k", k[None])
        self.heads = len(kinds)
        self.v = nn.Linear(dim, self.heads * D, bias=False)
        self.o = nn.Linear(self.heads * D, dim, bias=False)

    def forward(self, x):  # x: [B, L, dim]
        b, n, _ = x.shape
        v = self.v(x).view(b, n, self.heads, D).transpose(1, 2)
        q = self.q[:, :, :n].expand(b, -1, -1, -1)
        k = self.k[:, :, :n].expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(out.transpose(1, 2).reshape(b, n, -1))


class PlantedModel(nn.Module):
    """``layers[i]`` has heads of the kinds ``layout[i]`` (names of SHAPES)."""

    def __init__(self, layout, *, n: int = N, dim: int = 32, vocab: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layout = [list(kinds) for kinds in layout]
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(PlantedAttention(kinds, dim, n, g) for kinds in layout)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x


LAYOUT = (("a_shape", "vertical", "slash", "block"), ("block", "slash", "vertical", "a_shape"))

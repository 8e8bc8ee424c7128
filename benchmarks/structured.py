"""Structured attention inputs for benchmarks: q/k/v whose causal attention looks like a real model's.

Random q/k have no attention structure: the estimated index keeps most pairs, so the op either falls
back to dense or is benchmarked on hand-made indexes. Here the structure is made the way RoPE makes
it. Every head dimension pair p (dims p and p + D/2, HF's rotate_half layout) is a complex number
rotated by angle ``pos * w_p``. With q_i = R(i) a_h and k_j = R(j) b_g (g = h's kv head),

    q_i . k_j = Re sum_p conj(a_hp) b_gp exp(-1j * w_p * (i - j)),

a function of the offset o = i - j alone. Choosing conj(a_hp) b_gp = c_p exp(1j * w_p * o*) makes
pair p add c_p cos(w_p (o - o*)): all pairs agree at o = o*, and at other offsets they dephase.
- local window: pairs with w_p < 3 / window, centred at o* = window / 2 (keys 0..window back);
- slash: pairs with w_p > 1 / 256, centred at a per-head distant offset (one per head in "mixed");
- sink and heavy keys (verticals): the ``n_zero`` lowest-frequency pairs get w = 0 (at theta 500000
  the lowest pairs turn by less than 2.5 rad over 1M positions; a model's massive-activation sink
  plays this role). Every query has a constant component there; key 0 and a few heavy keys per kv
  head (positions drawn per kv head) are large along it, ordinary keys are zero.
Gaussian noise is added to q and k. Each part's peak logit is ln(N) + a per-mix constant, so its
share of the softmax mass stays roughly constant as rows grow. Because the sums of cosines dephase
only statistically, every offset keeps a tail (~ peak / sqrt(2 * pairs)): weak slashes at fixed
offsets, as in real models, and the sink's and heavy keys' logits move a little with the row.

Caveats: the shares drift with N (benchmarks/NOTES.md, "Structured attention", has the measured
ones): a mix is named for the part that dominates, not for exact percentages. All tensors are built
on the target device in chunks of positions: O(N * D) memory, deterministic by ``seed`` for a given
device.
"""

from __future__ import annotations

import dataclasses
import math

import torch

# Peak logit of each component = ln(N) + kappa (local, slash, sink, one heavy key; None = absent):
# growing with ln N keeps each share of the mass roughly constant while the row grows. The kappas
# were tuned by hand on mass_profile; the intended shares (sink, verticals, local, slash, noise):
# mixed ~ .15/.15/.50/.15/.05, local ~ .10/.05/.75/0/.10, slash ~ .10/.05/.20/.55/.10,
# vertical ~ .15/.60/.15/0/.10. What they measure is printed by bench_structured.py.
MIXES = {
    "mixed": dict(kappa=(1.5, 2.5, 3.0, -2.0), n_slash=1, n_heavy=16),
    "local": dict(kappa=(2.5, None, 1.5, -3.5), n_slash=0, n_heavy=8),
    "slash": dict(kappa=(-0.5, 4.0, 2.5, -1.5), n_slash=2, n_heavy=8),
    "vertical": dict(kappa=(-1.0, None, 3.0, -1.5), n_slash=0, n_heavy=64),
}
ALL_MIXES = (*MIXES, "random")
COMPONENTS = ("sink", "vertical", "local", "slash", "noise")
REGION = 32  # a slash's keys for mass_profile: offsets within +- REGION of its centre


@dataclasses.dataclass(frozen=True)
class Structure:
    """Where the structure is, per head (metadata for mass_profile and the tests)."""

    mix: str
    seq_len: int
    window: int
    slash_offsets: tuple[tuple[int, ...], ...]  # per query head
    heavy: tuple[tuple[int, ...], ...]  # per kv head, key positions (key 0, the sink, excluded)
    coef: dict  # peak logit per component


def rope_freqs(head_dim: int, theta: float = 500000.0, n_zero: int = 4) -> torch.Tensor:
    """float64 [D/2]: RoPE's ladder theta^(-2p/D), the ``n_zero`` lowest set to 0."""
    half = head_dim // 2
    w = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    if n_zero:
        w[-n_zero:] = 0.0
    return w


def _groups(w: torch.Tensor, window: int, n_zero: int):
    nz = torch.arange(len(w)) < len(w) - n_zero
    return (w < 3.0 / window) & nz, (w > 1.0 / 256) & nz, ~nz


def make_structure(mix: str, *, heads: int, kv_heads: int, seq_len: int, head_dim: int = 128,
                   window: int = 256, theta: float = 500000.0, n_zero: int = 4, seed: int = 0) -> Structure:
    """Draw slash offsets per query head and heavy-key positions per kv head; set the amplitudes (CPU)."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)} here, got {mix!r}")
    if seq_len < 4 * window:
        raise ValueError(f"seq_len {seq_len} is too short for a local window of {window} (need >= {4 * window})")
    m = MIXES[mix]
    gen = torch.Generator().manual_seed(seed)
    n = seq_len
    lo, hi = max(2 * window, n // 16), max(2 * window + 1, n // 2)  # distant slashes: n/16 .. n/2 back
    slash = tuple(tuple(sorted(torch.randint(lo, hi, (m["n_slash"],), generator=gen).tolist())) for _ in range(heads))
    heavy = tuple(tuple(sorted(torch.randperm(n - 1, generator=gen)[: m["n_heavy"]].add(1).tolist()))
                  for _ in range(kv_heads))
    coef = {c: (math.log(n) + m["kappa"][i] if m["kappa"][i] is not None else 0.0)
            for i, c in enumerate(("local", "slash", "sink", "vertical"))}
    return Structure(mix, n, window, slash, heavy, coef)


def _rotate(x: torch.Tensor, pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: [..., C, D] float32 (pairs p, p + D/2), rotated by pos * w (angles in float64, mod 2 pi)."""
    ang = torch.remainder(pos.double()[:, None] * w.to(pos.device)[None, :], 2 * math.pi).float()
    cos, sin = ang.cos(), ang.sin()  # [C, D/2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def head_vectors(st: Structure, heads: int, kv_heads: int, head_dim: int, theta: float = 500000.0,
                 n_zero: int = 4):
    """Unrotated a [H, D], b [Hkv, D] (ordinary keys), b_sink [D], b_heavy [D] (float64) such that
    R(i) a_h . R(j) b / sqrt(D) gives the Structure's peak logits."""
    w = rope_freqs(head_dim, theta, n_zero)
    sel_l, sel_s, sel_z = _groups(w, st.window, n_zero)
    half = head_dim // 2
    root = math.sqrt(head_dim)
    cl = st.coef["local"] / int(sel_l.sum()) * root
    cs = st.coef["slash"] / int(sel_s.sum()) * root
    beta = math.sqrt(cl + cs)  # ordinary keys: beta on every non-zero-frequency pair
    a = torch.zeros(heads, half, dtype=torch.complex128)
    for h in range(heads):
        prod = cl * sel_l * torch.exp(1j * w * st.window / 2)
        for o in st.slash_offsets[h]:
            prod = prod + cs * sel_s * torch.exp(1j * w * o)
        a[h] = prod.conj() / beta  # conj(a) * b = prod with b = beta (real)
    b = torch.where(sel_z, 0.0, beta).to(torch.complex128)
    nz = int(sel_z.sum())
    a[:, sel_z] = 1.0
    b_sink = torch.where(sel_z, st.coef["sink"] * root / nz, 0.0).to(torch.complex128)
    b_heavy = torch.where(sel_z, st.coef["vertical"] * root / nz, 0.0).to(torch.complex128)

    def real(z):  # complex pairs -> [.., D] in rotate_half layout
        return torch.cat([z.real, z.imag], -1)

    return real(a), real(b).expand(kv_heads, head_dim).clone(), real(b_sink), real(b_heavy)


def structured_qkv(mix: str, *, batch: int = 1, heads: int = 8, kv_heads: int = 2, seq_len: int,
                   head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0,
                   noise: float = 0.3, window: int = 256, return_structure: bool = False):
    """(q [B, H, N, D], k, v [B, Hkv, N, D]) with the attention structure of ``mix`` (see module doc);
    "random" gives plain randn (the never-slower case). ``noise``: std of q and k noise, in units of
    the vectors' RMS element. With ``return_structure`` also the :class:`Structure` (None for random)."""
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    shape_q, shape_k = (batch, heads, seq_len, head_dim), (batch, kv_heads, seq_len, head_dim)
    if mix == "random":
        q = torch.randn(shape_q, generator=gen, device=device, dtype=torch.float32).to(dtype)
        k = torch.randn(shape_k, generator=gen, device=device, dtype=torch.float32).to(dtype)
        v = torch.randn(shape_k, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return (q, k, v, None) if return_structure else (q, k, v)
    st = make_structure(mix, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=head_dim, window=window,
                        seed=seed)
    a, b, b_sink, b_heavy = (t.float().to(device) for t in head_vectors(st, heads, kv_heads, head_dim))
    w = rope_freqs(head_dim)
    sig_q = noise * float(a.pow(2).mean().sqrt())
    sig_k = noise * float(b.pow(2).mean().sqrt())
    q = torch.empty(shape_q, dtype=dtype, device=device)
    k = torch.empty(shape_k, dtype=dtype, device=device)
    heavy = torch.zeros(kv_heads, seq_len, dtype=torch.bool, device=device)
    for g, pos in enumerate(st.heavy):
        heavy[g, list(pos)] = True
    # no query noise on the zero-frequency pairs: there it would multiply the large sink/heavy keys
    qmask = torch.cat([_groups(w, window, 4)[2].logical_not()] * 2).float().to(device)
    chunk = 1 << 16
    for s in range(0, seq_len, chunk):
        pos = torch.arange(s, min(s + chunk, seq_len), device=device)
        c = len(pos)
        # q: [B, H, c, D] = R(i) (a_h + noise)
        qn = torch.randn(batch, heads, c, head_dim, generator=gen, device=device) * qmask
        qc = a[None, :, None, :] + sig_q * qn
        q[:, :, s:s + c] = _rotate(qc, pos, w).to(dtype)
        kb = b[:, None, :].expand(kv_heads, c, head_dim) + heavy[:, s:s + c, None] * b_heavy
        if s == 0:
            kb = kb.clone()
            kb[:, 0] += b_sink
        kc = kb[None] + sig_k * torch.randn(batch, kv_heads, c, head_dim, generator=gen, device=device)
        k[:, :, s:s + c] = _rotate(kc, pos, w).to(dtype)
    v = torch.randn(shape_k, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return (q, k, v, st) if return_structure else (q, k, v)


def sample_rows(seq_len: int, rows: int = 64) -> torch.Tensor:
    """``rows`` query positions spread evenly over the second half of the sequence."""
    return torch.linspace(seq_len // 2, seq_len - 1, rows).round().long().unique()


def _row_probs(q, k, b, h, rows, scale):
    """fp32 softmax [R, N] of query head h's sampled rows against all its keys, causal."""
    g = k.shape[1]
    kh = k[b, h // (q.shape[1] // g)].float()  # [N, D]
    logit = (q[b, h, rows].float() @ kh.T) * scale  # [R, N]: R rows only, never N x N
    keys = torch.arange(k.shape[2], device=q.device)
    logit.masked_fill_(keys[None, :] > rows.to(q.device)[:, None], float("-inf"))
    return torch.softmax(logit, -1)


def keys_for_mass(q: torch.Tensor, k: torch.Tensor, *, frac: float = 0.95, rows: int = 64,
                  scale: float | None = None) -> torch.Tensor:
    """int64 [B, H, R]: per sampled row (second half), how many keys hold ``frac`` of its softmax mass.
    Memory O(R * N) per head."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    idx = sample_rows(q.shape[2], rows)
    out = torch.empty(q.shape[0], q.shape[1], len(idx), dtype=torch.long)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            p = _row_probs(q, k, b, h, idx, scale).sort(-1, descending=True).values
            out[b, h] = ((p.cumsum(-1) < frac).sum(-1) + 1).cpu()
    return out


def mass_profile(q: torch.Tensor, k: torch.Tensor, st: Structure, *, rows: int = 64,
                 scale: float | None = None) -> dict[str, float]:
    """Mean share of softmax mass (over batch, heads, sampled rows) in sink (key 0), verticals (heavy
    keys), local window (offsets < window + 64), slashes (+- REGION around each head's offsets) and
    the rest ("noise"). A key in two regions counts once, in the first of that order."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    idx = sample_rows(q.shape[2], rows)
    n, g = q.shape[2], k.shape[1]
    keys = torch.arange(n, device=q.device)
    tot = dict.fromkeys(COMPONENTS, 0.0)
    cnt = 0
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            p = _row_probs(q, k, b, h, idx, scale)
            off = idx.to(q.device)[:, None] - keys[None, :]  # [R, N]
            sink = (keys == 0)[None, :].expand_as(p)
            heavy = torch.zeros(n, dtype=torch.bool, device=q.device)
            heavy[list(st.heavy[h // (q.shape[1] // g)])] = True
            vert = heavy[None, :].expand_as(p) & ~sink
            local = (off >= 0) & (off < st.window + 64) & ~sink & ~vert
            sl = torch.zeros_like(local)
            for o in st.slash_offsets[h]:
                sl |= (off - o).abs() <= REGION
            sl &= ~sink & ~vert & ~local
            parts = dict(sink=sink, vertical=vert, local=local, slash=sl)
            for c, msk in parts.items():
                tot[c] += float((p * msk).sum())
            tot["noise"] += float(p.sum()) - sum(float((p * msk).sum()) for msk in parts.values())
            cnt += len(idx)
    return {c: v / cnt for c, v in tot.items()}

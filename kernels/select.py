"""Mass-targeted vertical-slash selection: the adaptive index's choice, in the kernel's currency.

MInference keeps a fixed number of diagonals (slashes) and columns (verticals) per head. The sparse
kernel computes tiles of BLOCK_M queries x 64 keys, so an isolated diagonal costs 2-3 key tiles per
query block while it holds the mass of one key per row, and a fixed budget keeps picking after the
mass is covered. Here each head picks, per input, from two kinds of candidates:

- *slash groups*: 64 consecutive diagonal offsets [64 g, 64 g + 64). Their estimated mass is the sum
  over the group of the probe's diagonal scores less what the candidate columns (below) put on those
  offsets; their cost in keys per row is 64 when a neighbouring
  group holds at least as much mass (it will be picked first and the two share tiles) and 192 when
  isolated (a 64-wide band crosses a 128-query block as 191 keys);
- *columns*: single keys, cost 1, ranked by the part of the probe's column score that the diagonal
  scores do not explain (the column score minus the mean, over the offsets at which the key meets the
  probe rows, of each offset's group maximum of the diagonal scores): a key that is hit by a slash or
  sits in the local window has no mass of its own, even where the band's noise makes its column score
  spiky, while a vertical keeps almost all of its score; so the two kinds are not counted twice, and
  the probe rows are not "covered" by columns along a band that would not serve any other row.

Every column within the cap ``v_count[h]`` is kept (the top ones by that mass; columns are cheap, and
a vertical's mass is the least stable along the sequence), and so are the groups of the ``n_force_s``
nearest diagonals. Slash groups are then added in order of mass per unit of cost until the kept mass
reaches ``mass[h]`` times the total, within ``ceil(s_count[h] / 64)`` groups (a target of 1 keeps every
candidate within the caps). The target is held at 8 row positions along the sequence, not only at the
probe rows: a column at key j serves rows >= j and a diagonal at offset o rows >= o, so a heavy key
near the end (which can hold half of the probe's mass) is no credit for the rows before it, and each
position's total is the mass its rows can reach; a position whose rows reach less than ``R_FLOOR`` of
the probe's mass (the head's structure lies beyond them) has only the probe's noise there and is not held
to the target. A head whose caps do not allow the target keeps
every candidate within them, unless they hold less than ``STRUCTURE_FLOOR`` (0.9) of its estimated
mass: such a head (random q/k hold 0.02-0.2 there at 32K-256K; the structured benchmark inputs
0.94-0.997 at 128K) runs the fixed-budget choice instead. Mass is estimated from the last queries only
(MInference's assumption that the pattern is stable along the sequence), so the target is an
estimate, not a guarantee for every row.

Pure torch on [B, H, N] and [B, H, candidates] tensors, shared by both implementations: a few
launches, no host synchronisation (caps are Python ints), capturable in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from .reference import force_first

GROUP = 64  # diagonals per slash group (the key tile width)
R_ROWS = 8  # row positions at which the kept mass is held to the target
# A row position is held to the target only where its rows reach at least this share of the probe's mass.
R_FLOOR = 1e-3
# A head whose candidates within the caps hold less than this share of its estimated mass (and less
# than its target) has too little structure for them: it runs the fixed-budget choice instead.
STRUCTURE_FLOOR = 0.9


def prefix_sum(x: torch.Tensor, chunk: int = 1024, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inclusive cumulative sum of ``x`` along its last dimension, accumulated in float64, returned in ``dtype``.

    PyTorch's CUDA scan along the last dimension gives each row a few threads that walk it in steps of
    32 elements: over [1, 8, 128K] (the selection's shape) one call took 170 us on an H100, and three of
    them were a quarter of the index's device time. Here the row is cut into ``chunk``-long pieces (many
    short rows, scanned in parallel) and each piece gets the sum of those before it. float64 throughout, as
    PyTorch's CPU scan of float32 accumulates, so both devices give the CPU's values up to the last bit
    (the order of the additions differs). ``dtype``: the result's (None: ``x``'s); float64 keeps a long row's
    prefix differences exact to float32.
    """
    dtype = x.dtype if dtype is None else dtype
    n = x.shape[-1]
    xd = x.to(torch.float64)
    if n <= chunk or torch.compiler.is_compiling():  # Inductor (ops.compile_index) makes its own scan kernel;
        return xd.cumsum(-1).to(dtype)  # the pieces' symbolic count fails its value-range analysis
    m = -(-n // chunk)
    inner = torch.nn.functional.pad(xd, (0, m * chunk - n)).unflatten(-1, (m, chunk)).cumsum(-1)
    # each piece starts from the sum of the pieces before it: an exclusive scan of the pieces' sums (not
    # the inclusive scan minus the piece's own sum, which cancels: a piece of 1e3 after one of 3 left 5e-14)
    before = torch.nn.functional.pad(inner[..., :-1, -1].cumsum(-1), (1, 0))
    inner += before[..., None]
    return inner.flatten(-2)[..., :n].to(dtype)


def column_scores_reference(col, gmax, gcum, end, sink0, *, last_q: int, n_force: int, tie: float):
    """fp32 (score, own) [B, H, N]: each key's own mass (``own``: its column score less the mean, over
    the offsets at which it meets the probe rows, of the envelope of the diagonal scores), and its rank
    score (``own + tie * col``, +inf for the ``n_force`` forced keys from ``sink0`` [B], or 0).

    col: fp32 [B, H, N]; gmax: fp32 [B, H, G], the envelope (each group of 64 offsets' largest diagonal
    score); gcum: float64 [B, H, G + 1], its exclusive prefix sum; end: int [B], each row's probe end E
    (key j meets the probe's rows at offsets [E - ql - j, E - j), ql = min(last_q, N)).
    """
    B, H, N = col.shape
    G = gmax.shape[-1]
    dev = col.device
    E = end.to(dev, torch.int64).expand(B).view(B, 1, 1)
    ql = min(last_q, N)
    # the envelope summed over keys [0, t) for t = 0..N: whole groups before t's, then t % 64 keys of its own
    r = torch.arange(GROUP, device=dev, dtype=torch.float64)
    dsum = (gcum[..., :G, None] * GROUP + r * gmax[..., None].to(torch.float64)).flatten(-2)  # t < 64 G
    dsum = torch.cat([dsum, gcum[..., G:] * GROUP], -1)[..., : N + 1]  # t = 64 G: every group  [B, H, N + 1]
    j = torch.arange(N, device=dev)
    hi = (E - j).clamp(min=0).expand(B, H, N)
    lo = (E - ql - j).clamp(min=0).expand(B, H, N)
    explained = ((dsum.gather(-1, hi) - dsum.gather(-1, lo)) / E.clamp(max=ql, min=1)).to(col.dtype)
    own = (col - explained).clamp(min=0.0)
    return force_first(own + col * tie, n_force, sink0), own


def column_scores(col, gmax, gcum, end, sink0, *, last_q: int, n_force: int, tie: float):
    """:func:`column_scores_reference`, in one Triton launch on CUDA tensors (``kernels/select_triton.py``),
    except under ``torch.compile`` (``ops.compile_index``), where Inductor fuses the torch version."""
    args, kw = (col, gmax, gcum, end, sink0), dict(last_q=last_q, n_force=n_force, tie=tie)
    if col.is_cuda and not torch.compiler.is_compiling():
        from . import fallback
        from .select_triton import column_scores as fn

        return fallback.run("_col_score_kernel", sink0 is not None, fn, column_scores_reference, *args, **kw)
    return column_scores_reference(*args, **kw)


def slash_group_count(s_count: int, n_force_s: int = 100) -> int:
    """Groups of 64 diagonals that a slash cap of ``s_count`` diagonals allows (never fewer than the
    groups of the ``n_force_s`` forced diagonals)."""
    return max(1, math.ceil(s_count / GROUP), math.ceil(n_force_s / GROUP))


def vertical_slash_select(col, diag, v_count, s_count, mass, *, last_q: int, n_force_v: int = 30,
                          n_force_s: int = 100, v_max: int, s_max: int, sink_start=None, probe_end=None):
    """int32 (v_idx [B, H, Vc], s_off [B, H, Gc * 64]), -1 = unused, for heads with ``mass[h] > 0``,
    and fp32 ``share`` [B, H]: the kept candidates' share of the estimated mass, at the row position
    where it is lowest (the target is met where ``share >= mass``). A head whose target is not met keeps
    every candidate within its caps; where even they hold less than ``STRUCTURE_FLOOR`` of the mass, the
    attention has too little structure for the caps and the op uses the fixed-budget choice for that
    head, MInference's reading of the same budgets (:func:`target_outcome`).

    col, diag: fp32 [B, H, N] from ``vertical_slash_scores``; v_count, s_count: int64 [H] caps
    (clamped like MInference's budgets); mass: fp32 [H] targets in (0, 1] (a head with 0 keeps only
    its forced candidates); v_max, s_max: the largest caps as Python ints (no device read);
    sink_start: int [B] or None, each row's first real key (the forced columns start there);
    probe_end: int [B] or None (N), each row's last real query + 1, where the estimation's probe ended
    (right padding): the row positions below count from there.
    """
    B, H, N = col.shape
    dev = col.device
    G = math.ceil(N / GROUP)
    n_forced_groups = min(G, slash_group_count(n_force_s))
    ql = min(last_q, N)
    # each row's end E (N but for right padding), [B, 1, 1]
    E = (torch.full((B,), N, device=dev, dtype=torch.int64) if probe_end is None
         else probe_end.to(dev, torch.int64).expand(B)).view(B, 1, 1)

    # columns: the mass the diagonals do not explain, cost 1. Key j meets the probe rows at offsets
    # E - ql - j .. E - 1 - j; if attention depended on the offset alone, its column score would be the
    # mean diagonal score over those offsets. Only the excess is the key's own (a vertical): a key hit
    # by a slash or the local window carries no mass of its own, so the two are not counted twice.
    # The diagonal scores are noisy along a band (each row hits other keys there), so a band's keys have
    # spiky column scores: the explanation uses each group's largest diagonal score, an upper envelope.
    gmax = torch.nn.functional.pad(diag, (0, G * GROUP - N)).view(B, H, G, GROUP).amax(-1)  # [B, H, G]
    # the envelope's prefix sums in float64, here over groups: at 128K the difference of two float32 prefix sums
    # over keys has enough rounding noise to reorder about half of a head's columns (those with no mass of their
    # own, whose excess is then noise, not 0); exact, they rank by their column score, and the same error costs
    # 5% fewer pairs on `mixed` (index_quality, 128K: density 0.137 -> 0.130 at mass 1.0)
    # (one scan up to 1M keys: PyTorch's scan over a row of G <= 16384 takes a few us, its pieces more launches)
    gcum = torch.nn.functional.pad(prefix_sum(gmax, chunk=16384, dtype=torch.float64), (1, 0))  # [B, H, G + 1]
    c_score, cm = column_scores(col, gmax, gcum, E.view(B), sink_start, last_q=last_q, n_force=n_force_v,
                                tie=2.0 ** -20)  # ties (no excess) broken by the column score, as MInference ranks
    kc = min(N, v_max)
    c_ratio, c_idx = torch.topk(c_score, kc, dim=-1, sorted=True)  # [B, H, kc]
    c_mass = cm.gather(-1, c_idx)
    c_rank_ok = torch.arange(kc, device=dev)[None, :] < v_count.to(dev)[:, None]  # [H, kc]

    # slash groups: the diagonal scores less what the candidate columns put there (a vertical at key j
    # adds its mass to the offsets at which it meets the probe rows, spread evenly), so a sink or a
    # heavy key is not counted again as the far diagonals that reach it
    c_hi = (E - c_idx).clamp(min=0)  # [B, H, kc]: the offsets at which the probe rows meet column c_idx
    c_lo = (E - ql - c_idx).clamp(min=0)
    share = torch.where(c_rank_ok, c_mass, 0.0) / (c_hi - c_lo).clamp(min=1)
    delta = torch.zeros(B, H, N + 1, device=dev, dtype=diag.dtype)
    delta.scatter_add_(-1, c_lo, -share)
    delta.scatter_add_(-1, c_hi, share)
    slash = (diag + prefix_sum(delta)[..., :N]).clamp(min=0.0)
    gm = torch.nn.functional.pad(slash, (0, G * GROUP - N)).view(B, H, G, GROUP).sum(-1)  # [B, H, G]
    ninf = torch.full_like(gm[..., :1], float("-inf"))
    left = torch.cat([ninf, gm[..., :-1]], -1)
    right = torch.cat([gm[..., 1:], ninf], -1)
    isolated = (left < gm) & (right < gm)
    g_ratio = gm / torch.where(isolated, 3.0 * GROUP, 1.0 * GROUP)
    g_ratio[..., :n_forced_groups] = float("inf")
    kg = min(G, slash_group_count(s_max, n_force_s))
    g_ratio, g_idx = torch.topk(g_ratio, kg, dim=-1, sorted=True)  # [B, H, kg]
    scum = torch.nn.functional.pad(prefix_sum(slash), (1, 0))  # [B, H, N + 1]
    return keep_candidates(c_ratio, c_idx, c_mass, g_ratio, g_idx, scum, v_count.to(dev), s_count.to(dev),
                           mass.to(dev), E.view(B), n_forced_groups=n_forced_groups)


def keep_candidates_reference(c_ratio, c_idx, c_mass, g_ratio, g_idx, scum, v_count, s_count, mass, end, *,
                              n_forced_groups: int):
    """The selection's last step: which candidates a head keeps, as (v_idx [B, H, kc], s_off
    [B, H, kg * 64]) int32 (-1 unused) and its fp32 ``share`` [B, H] (see :func:`vertical_slash_select`).

    c_ratio, c_idx, c_mass: the top kc column scores, their keys and own masses [B, H, kc] (sorted);
    g_ratio, g_idx: the top kg slash groups by mass per cost [B, H, kg]; scum: fp32 [B, H, N + 1],
    the prefix sums of the slash scores (less the columns' share); v_count, s_count: int64 [H] caps; mass:
    fp32 [H] targets; end: int [B], each row's probe end E. Sums over candidates accumulate in float64.
    """
    B, H, kc = c_idx.shape
    kg = g_idx.shape[-1]
    N = scum.shape[-1] - 1
    dev = scum.device
    E = end.to(dev, torch.int64).expand(B).view(B, 1, 1)
    c_rank_ok = torch.arange(kc, device=dev)[None, :] < v_count[:, None]  # [H, kc]
    g_cap = torch.clamp(_groups_of(s_count), min=n_forced_groups)
    g_rank_ok = torch.arange(kg, device=dev)[None, :] < g_cap[:, None]  # [H, kg]

    # one ordering per head: forced first, then mass per unit of cost; keep until the target is met
    ratio = torch.cat([c_ratio, g_ratio], -1)
    ok = torch.cat([c_rank_ok, g_rank_ok], -1)[None].expand(B, H, kc + kg)
    # Columns cost one key a row (v of them cost what v / 64 slash groups do) and a vertical's mass is
    # the least stable along the sequence, so every column within the cap is kept, as MInference does;
    # the target decides how many slash groups are needed on top of their mass.
    is_col = torch.arange(kc + kg, device=dev) < kc
    forced = ok & ((ratio == float("inf")) | is_col)  # sorted first
    ratio = torch.where(forced, float("inf"), ratio)
    ratio = torch.where(ok, ratio, float("-inf"))
    order = torch.sort(ratio, dim=-1, descending=True, stable=True).indices

    # The target holds for rows all along the sequence, not only for the probe rows: a candidate serves
    # only the rows that can reach it (a column at key j rows >= j, a diagonal at offset o rows >= o),
    # so a heavy key near the end, which can hold half of the probe's mass, is no credit for the rows
    # before it. The kept and total mass are counted at R_ROWS row positions p_r = E r / R_ROWS - 1
    # (the last is the probe's); candidates are kept while some position is below its target.
    R = min(R_ROWS, N)
    pk = ((torch.arange(1, R + 1, device=dev) * E) // R - 1)[:, :, None, :]  # [B, 1, 1, R]
    c_mass_r = torch.where(c_rank_ok[..., None] & (c_idx[..., None] <= pk), c_mass[..., None], 0.0)  # [B, H, kc, R]
    g_lo = g_idx * GROUP
    a = torch.minimum(g_lo[..., None], pk + 1).flatten(-2)
    b = torch.minimum((g_lo + GROUP).clamp(max=N)[..., None], pk + 1).flatten(-2)
    g_mass_r = (scum.gather(-1, b) - scum.gather(-1, a)).view(B, H, kg, R).clamp(min=0.0)
    g_mass_r = torch.where(g_rank_ok[..., None], g_mass_r, 0.0)
    # [B, H, R]: all the mass these rows can reach.
    total = scum.gather(-1, (pk[:, :, 0] + 1).expand(B, H, R)) + c_mass_r.sum(-2, dtype=torch.float64).to(torch.float32)
    # A position whose rows reach almost none of the probe's mass (its structure lies
    # beyond them, e.g. a distant diagonal) gets no estimate from the probe, only its noise: it is not held
    # to the target (else low-mass groups are kept to cover a share of that noise)
    live = total >= R_FLOOR * total[..., -1:]  # the probe's own position is live whenever it has mass
    total = torch.where(live, total, 0.0)
    cand_mass = torch.cat([c_mass_r, g_mass_r], -2)  # [B, H, kc + kg, R]
    m_sorted = cand_mass.gather(-2, order[..., None].expand(B, H, kc + kg, R))
    # kept mass before this candidate, per position (the scan runs along the last dimension: PyTorch's CUDA scan
    # over an inner one, [B, H, kc + kg, R] along kc + kg, took 185 us at 128K)
    before = prefix_sum(m_sorted.transpose(-1, -2)).transpose(-1, -2) - m_sorted
    target = mass.to(dev, torch.float32)[None, :, None] * total  # [B, H, R]
    everything = mass.to(dev)[None, :, None] >= 1.0  # mass 1: every candidate within the caps
    need = ((before < target[..., None, :]) & (m_sorted > 0)).any(-1)
    keep_sorted = need | (everything & (ratio.gather(-1, order) > float("-inf"))) | forced.gather(-1, order)
    kept_r = (keep_sorted[..., None] * m_sorted).sum(-2, dtype=torch.float64).to(torch.float32)  # [B, H, R]
    # the kept share of the estimated mass, at the position where it is lowest (1 where rows reach none)
    share = torch.where(total > 0, kept_r / total.clamp(min=1e-30), 1.0).amin(-1).clamp(max=1.0)  # [B, H]
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    keep_c, keep_g = keep[..., :kc], keep[..., kc:]

    v_idx = torch.where(keep_c, c_idx, -1).to(torch.int32)
    offs = g_idx[..., None] * GROUP + torch.arange(GROUP, device=dev)  # [B, H, kg, 64]
    s_off = torch.where(keep_g[..., None] & (offs < N), offs, -1).flatten(-2).to(torch.int32)
    return v_idx, s_off, share


def keep_candidates(c_ratio, c_idx, c_mass, g_ratio, g_idx, scum, v_count, s_count, mass, end, *, n_forced_groups: int):
    """:func:`keep_candidates_reference`, in one Triton launch on CUDA tensors (``kernels/select_triton.py``),
    except under ``torch.compile`` (``ops.compile_index``)."""
    args = (c_ratio, c_idx, c_mass, g_ratio, g_idx, scum, v_count, s_count, mass, end)
    if scum.is_cuda and not torch.compiler.is_compiling():
        from . import fallback
        from .select_triton import keep_candidates as fn

        kp = 1 << (c_idx.shape[-1] + g_idx.shape[-1] - 1).bit_length()  # its constexpr: candidates, a power of 2
        return fallback.run("_keep_kernel", kp, fn, keep_candidates_reference, *args, n_forced_groups=n_forced_groups)
    return keep_candidates_reference(*args, n_forced_groups=n_forced_groups)


def target_outcome(share: torch.Tensor, mass: torch.Tensor):
    """bool (reached, selected) [B, H] from the ``share`` of :func:`vertical_slash_select`: the target
    was met at every position, and the head runs this selection (its share is at least
    ``min(mass, STRUCTURE_FLOOR)``; else it has too little structure and runs the fixed choice)."""
    m = mass.to(share.device, torch.float32)[None, :]
    tol = 1 - 1e-6
    return share >= m * tol, share >= torch.clamp(m, max=STRUCTURE_FLOOR) * tol


def _groups_of(s_count: torch.Tensor) -> torch.Tensor:
    return (s_count + GROUP - 1) // GROUP


def adaptive_cap_s(n_groups: int, block_m: int, block_n: int = 64) -> int:
    """A bound on the blocks one query block's index can hold for ``n_groups`` selected groups.

    A run of k adjacent groups is a window of 64 k + block_m - 1 keys: at most k + block_m // block_n
    + 1 blocks; filling a gap smaller than block_n when two runs merge adds at most one block.
    """
    return n_groups * (block_m // block_n + 2) + 1

"""The custom op ``torch.ops.mif.sparse_attention`` that the pass puts in place of a causal SDPA.

It is the only place that chooses between dense SDPA (short prompts: the original computation) and
the sparse path (estimation for all heads at once, one unified index, one sparse-attention call),
and between the pure-PyTorch reference and the Triton kernels (``impl``; "auto" = Triton on CUDA and
dense SDPA on CPU, where the reference is slower than dense: CPU callers that want the sparse path,
tests, search and evaluation, pass ``impl="reference"``). Each call records for the report whether
it ran sparse or dense and why (host-side counters; ``mif_compile.report.record_run``).

The layer's head plan arrives as three int lists (pattern code, first and second budget per head),
baked into the graph as constants; the sequence length is read at run time, so a new prompt length
never recompiles. Per-head tensors derived from the plan come from one pinned host buffer per plan
(one small asynchronous copy per call), so the op holds no device memory between calls and can be
captured in a CUDA graph, including by cudagraph trees (``mode="reduce-overhead"``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import report as _report
from .config import PATTERN_FROM_CODE, HeadPattern, Pattern, clamp_budget

__all__ = ["sparse_attention", "sparse_attention_backward", "dense_attention", "run_layer", "layer_grads",
           "sparse_index", "broadcast_batch", "encode_heads", "encode_mass", "build_layer_index", "kept_density",
           "collect_stats", "vs_choice", "compile_index", "BLOCK_N"]

BLOCK_N = 64  # key granularity of every pattern (contract: docs/kernel-contract.md)


def encode_heads(heads: Sequence[HeadPattern]) -> tuple[list[int], list[int], list[int]]:
    """HeadPatterns -> the op's (patterns, budget0, budget1) int lists."""
    codes, b0, b1 = [], [], []
    for hp in heads:
        b = list(hp.budget) + [0, 0]
        codes.append(hp.pattern.code)
        b0.append(int(b[0]))
        b1.append(int(b[1]))
    return codes, b0, b1


def encode_mass(heads: Sequence[HeadPattern]) -> list[float]:
    """HeadPatterns -> the op's per-head mass targets (0.0: fixed budgets or not vertical-slash)."""
    return [float(hp.mass) if hp.adaptive else 0.0 for hp in heads]


_MASS_SCALE = 1 << 24  # mass targets travel in the int64 plan buffer as fixed point


# Elements of the (B, 1, rows, keys) mask of one chunk of the padded dense path: its memory is
# O(B * rows * N), never the (B, 1, N, N) mask (16 GiB per sequence at 128K).
_DENSE_MASK_ELEMS = 1 << 23
# A chunk's keys end at a multiple of this past its last row: PyTorch's CPU flash kernel visits keys
# in splits of 512, and a fully masked split adds exact zeros, so each row is bit for bit what the
# full-mask call gives (tested); GPU kernels agree to rounding.
_KEY_ALIGN = 512


def dense_chunks(batch: int, n: int) -> list[tuple[int, int, int]]:
    """(r0, r1, key_end) of the padded dense path's chunks: rows [r0, r1), multiples of 256, with
    about ``_DENSE_MASK_ELEMS`` mask elements each, attending keys [0, key_end)."""
    rows = max(256, (_DENSE_MASK_ELEMS // max(1, batch * n)) // 256 * 256)
    out = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out.append((r0, r1, min(n, -(-r1 // _KEY_ALIGN) * _KEY_ALIGN)))
    return out


def dense_rows(q, k, v, key_padding: torch.Tensor, scale: float, r0: int, r1: int, key_end: int) -> torch.Tensor:
    """Rows [r0, r1) of causal SDPA under ``key_padding`` (q holds all rows or only these): one SDPA
    call over keys [0, key_end) with a (B, 1, r1 - r0, key_end) mask. Differentiable."""
    if q.shape[2] != r1 - r0:
        q = q[:, :, r0:r1]
    rows = torch.arange(r0, r1, device=q.device)
    keys = torch.arange(key_end, device=q.device)
    mask = (keys[None, :] <= rows[:, None])[None, None] & key_padding[:, None, None, :key_end].to(torch.bool)
    return F.scaled_dot_product_attention(q, k[:, :, :key_end], v[:, :, :key_end], attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """Causal SDPA, the computation the pass replaced (with a (B, L) padding mask if given).

    q, k: [B, H(kv), N, D]; v: [B, Hkv, N, Dv] -> [B, H, N, Dv]. With padding, queries go in chunks of
    rows (:func:`dense_chunks`) that see only the keys up to their last row, so no N x N tensor is
    built; each row's result is SDPA's under the full (B, 1, N, N) mask (the keys a chunk leaves out
    are masked for all its rows), rows with no real key included.
    """
    gqa = q.shape[1] != k.shape[1]
    if key_padding is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa).contiguous()
    B, H, N, _ = q.shape
    out = q.new_empty(B, H, N, v.shape[-1])
    for r0, r1, key_end in dense_chunks(B, N):
        out[:, :, r0:r1] = dense_rows(q, k, v, key_padding, scale, r0, r1, key_end)
    return out


@dataclasses.dataclass(frozen=True)
class _LayerPlan:
    """Host-side facts of one layer's plan at one length (cached)."""

    has_vs: bool
    has_ashape: bool
    has_bs: bool
    has_vs_like: bool  # heads that go through build_vs_index (vertical-slash, A-shape, dense)
    v_count: tuple
    s_count: tuple
    n_sink: tuple
    n_local: tuple  # A-shape heads' local window (0 elsewhere)
    top_k: tuple
    mass: tuple  # per head, fixed point (x / _MASS_SCALE); 0 = fixed budgets
    has_adaptive_vs: bool
    cap_s: int
    cap_v: int
    cap_bs: int


@functools.lru_cache(maxsize=256)
def _layer_plan(patterns: tuple, b0: tuple, b1: tuple, n: int, block_m: int, mass: tuple = ()) -> _LayerPlan:
    from .kernels.select import adaptive_cap_s, slash_group_count

    v_count, s_count, n_sink, n_local, top_k, caps, mass_fx = [], [], [], [], [], [], []
    n_blocks = math.ceil(n / BLOCK_N)
    mass = tuple(mass) or (0.0,) * len(patterns)
    for code, a, b, m in zip(patterns, b0, b1, mass):
        p = PATTERN_FROM_CODE[code]
        vc = sc = sink = loc = tk = mfx = 0
        if p is Pattern.VERTICAL_SLASH:
            vc, sc = clamp_budget(p, (a, b), n)
            # an adaptive head runs the fixed choice where its caps hold too little of the estimated mass
            # (kernels/select.py, STRUCTURE_FLOOR): the index is sized for both
            caps.append(max(sc * (block_m // BLOCK_N + 1) + 1,
                            adaptive_cap_s(slash_group_count(sc), block_m, BLOCK_N)))
            if m > 0:
                mfx = max(1, round(m * _MASS_SCALE))
        elif p is Pattern.A_SHAPE:
            sink, loc = clamp_budget(p, (a, b), n)
            caps.append(math.ceil((loc + block_m) / BLOCK_N) + math.ceil(sink / BLOCK_N) + 2)
        elif p is Pattern.BLOCK_SPARSE:
            (tk,) = clamp_budget(p, (a,), n)
        else:
            sink = n
            caps.append(n_blocks + 1)
        v_count.append(vc)
        s_count.append(sc)
        n_sink.append(sink)
        n_local.append(loc)
        top_k.append(tk)
        mass_fx.append(mfx)
    kinds = {PATTERN_FROM_CODE[c] for c in patterns}
    vs_heads = [i for i, c in enumerate(patterns) if PATTERN_FROM_CODE[c] is Pattern.VERTICAL_SLASH]
    return _LayerPlan(
        has_vs=Pattern.VERTICAL_SLASH in kinds,
        has_ashape=Pattern.A_SHAPE in kinds,
        has_bs=Pattern.BLOCK_SPARSE in kinds,
        has_vs_like=bool(kinds - {Pattern.BLOCK_SPARSE}),
        v_count=tuple(v_count),
        s_count=tuple(s_count),
        n_sink=tuple(n_sink),
        n_local=tuple(n_local),
        top_k=tuple(top_k),
        mass=tuple(mass_fx),
        has_adaptive_vs=any(mass_fx[i] > 0 for i in vs_heads),
        cap_s=max(1, min(max(caps, default=1), n_blocks + 1)),
        cap_v=max(1, max(v_count)),
        cap_bs=max(1, min(max(top_k) * (block_m // BLOCK_N), n_blocks)),
    )


# Host copies of the per-head plan rows, one per distinct plan, never evicted: a CUDA graph that
# captured the op copies from these (pinned) buffers at every replay, so they must outlive it.
_HOST_PLAN: dict = {}


def _plan_tensors(lp: _LayerPlan, device: torch.device) -> dict[str, torch.Tensor]:
    """The layer plan's per-head tensors on ``device``, made fresh at every call by one host->device
    copy from a cached pinned buffer. Nothing device-side is cached: under
    ``mode="reduce-overhead"`` the op's first run happens inside the CUDA-graph memory pool, where a
    cached device tensor would be a live allocation the graph does not own (cudagraph trees refuse
    that), and a copy from pinned memory is legal inside a capture."""
    rows = (lp.v_count, lp.s_count, lp.n_sink, lp.n_local, lp.top_k, lp.mass)
    key = (rows, device.type)
    host = _HOST_PLAN.get(key)
    if host is None:
        host = torch.tensor(rows, dtype=torch.int64)  # [6, H]
        if device.type == "cuda":
            host = host.pin_memory()
        _HOST_PLAN[key] = host
    plan = host.to(device, non_blocking=True) if device.type != "cpu" else host
    v_count, s_count, n_sink, n_local, top_k, mass = plan.unbind(0)
    t = {"v_count": v_count, "s_count": s_count, "n_sink": n_sink, "top_k": top_k, "is_bs": top_k > 0,
         "mass": mass.to(torch.float32) / _MASS_SCALE, "is_adaptive": mass > 0}
    if lp.has_ashape:
        offs = torch.arange(max(lp.n_local), dtype=torch.int64, device=device)
        # [H, width]: 0..n_local-1 for A-shape heads, -1 elsewhere
        t["ashape_rows"] = torch.where(offs[None, :] < n_local[:, None], offs[None, :], -1).to(torch.int32)
        t["is_ashape"] = n_local > 0
    return t


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] >= size:
        return x
    return F.pad(x, (0, size - x.shape[-1]), value=-1)


def _merge_index(a, b, take_b: torch.Tensor):
    """Per head: index ``b`` where ``take_b[h]`` else ``a`` (same SparseIndex type)."""
    sel = take_b[None, :, None]
    cap_s = max(a.block_offset.shape[-1], b.block_offset.shape[-1])
    cap_v = max(a.column_index.shape[-1], b.column_index.shape[-1])
    return type(a)(
        torch.where(sel, b.block_count, a.block_count),
        torch.where(sel[..., None], _pad_last(b.block_offset, cap_s), _pad_last(a.block_offset, cap_s)),
        torch.where(sel, b.column_count, a.column_count),
        torch.where(sel[..., None], _pad_last(b.column_index, cap_v), _pad_last(a.column_index, cap_v)),
    )


def run_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    patterns: Sequence[int],
    budget0: Sequence[int],
    budget1: Sequence[int],
    min_seq_len: int,
    last_q: int = 64,
    block_m: int = 128,
    impl: str = "auto",
    max_density: float = 1.0,
    mass: Optional[Sequence[float]] = None,
    site: int = -1,
) -> torch.Tensor:
    """One attention layer of a causal prefill. q, k: [B, H(kv), N, D]; v: [B, Hkv, N, Dv] -> [B, H, N, Dv].

    Dense SDPA below ``min_seq_len``, on CPU with ``impl="auto"`` (the CPU sparse path is the
    pure-PyTorch reference, slower than dense; ``impl="reference"`` asks for it), and when the
    estimated index keeps more than ``max_density`` of the causal pairs (see :func:`sparse_index`).
    ``mass``: per-head targets of the adaptive index (0 or None: fixed budgets). ``site`` (the
    backend's site id) is where the choice is recorded for the report
    (:func:`mif_compile.report.record_run`).
    """
    q, k, v, key_padding, patterns, budget0, budget1, mass, top_left = _run_time_guard(
        q, k, v, key_padding, patterns, budget0, budget1, mass)
    if top_left:
        return _top_left_causal(q, k, v, key_padding, scale)
    return _attend(q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q, block_m, impl,
                   max_density, mass, site)


def _attend(q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q, block_m, impl,
            max_density, mass, site, vs_scores=None):
    """run_layer after its run-time guard (``vs_scores``: the estimation's scores, computed already)."""
    index = sparse_index(q, k, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q, block_m, impl,
                         max_density, mass, site=site, vs_scores=vs_scores)
    if index is None:
        return dense_attention(q, k, v, key_padding, scale)
    from . import kernels as K

    out = K.sparse_attention(
        q, k, v, index, scale=scale, block_m=block_m, block_n=BLOCK_N, key_padding=key_padding, impl=impl
    )
    return out.contiguous()


def _run_time_guard(q, k, v, key_padding, patterns, budget0, budget1, mass=None):
    """What the pass could not prove at compile time, checked on the actual tensors.

    - q_len != kv_len (both symbolic): the site is the original ``is_causal`` SDPA, whose mask is
      then top-left aligned; ``top_left`` says to compute exactly that.
    - the padding lookup ``mask[b, k]`` over b < B, k < kv_len: the op reads ``mask[:B, :kv_len]``;
      a smaller mask is what eager would have refused with an index error.
    - a symbolic head count: a one-pattern plan is expanded to the heads; a per-head plan must match.
    """
    b, h, lk = q.shape[0], q.shape[1], k.shape[2]
    if key_padding is not None and tuple(key_padding.shape) != (b, lk):
        if key_padding.dim() != 2 or key_padding.shape[0] < b or key_padding.shape[1] < lk:
            raise ValueError(
                f"mif.sparse_attention: the padding mask has shape {tuple(key_padding.shape)}, smaller than "
                f"(batch={b}, kv_len={lk}) that the attention mask indexes (eager raises an index error here)")
        key_padding = key_padding[:b, :lk]
    if len(patterns) != h:
        if len(patterns) != 1:
            raise ValueError(
                f"mif.sparse_attention: the plan gives {len(patterns)} head patterns for this layer, but the "
                f"attention has {h} query heads at run time")
        patterns, budget0, budget1 = list(patterns) * h, list(budget0) * h, list(budget1) * h
        mass = list(mass) * h if mass else mass
    return q, k, v, key_padding, patterns, budget0, budget1, mass, q.shape[2] != lk


def _top_left_causal(q, k, v, key_padding, scale):
    """``sdpa(q, k, v, is_causal=True)`` for q_len != kv_len (top-left aligned), with the padding."""
    gqa = q.shape[1] != k.shape[1]
    if key_padding is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = causal[None, None] & key_padding[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.contiguous()


def _record_run(site: int, n: int, reason: str | None, detail: str = "", density: float | None = None,
                missed: tuple[int, int] | None = None) -> None:
    if site >= 0:
        _report.record_run(site, n, reason, detail, density, missed)


_CPU_NOTED = False


def _note_cpu_auto() -> None:
    global _CPU_NOTED
    if not _CPU_NOTED:
        _CPU_NOTED = True
        _report.log.info("CPU tensors with impl='auto': the op runs dense SDPA (the sparse path on CPU is the "
                         "pure-PyTorch reference, slower than dense); impl='reference' runs the reference")


def sparse_index(q, k, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q=64, block_m=128,
                 impl="auto", max_density=1.0, mass=None, *, site: int = -1, record: bool = True,
                 vs_scores: Optional[tuple] = None):
    """The layer's sparse index, or None when :func:`run_layer` runs dense SDPA: below
    ``min_seq_len``, an all-dense plan, CPU tensors with ``impl="auto"``, or an estimated density above
    ``max_density``. The same inputs give the same answer, so the backward recomputes it (with
    ``record=False``: nothing reported) instead of keeping the index."""
    rec = _record_run if record else (lambda *a, **kw: None)
    n = q.shape[2]
    if n < max(min_seq_len, 2):
        rec(site, n, _report.SHORT, f"N={n} < min_seq_len {min_seq_len}")
        return None
    if all(c == Pattern.DENSE.code for c in patterns):
        rec(site, n, _report.PLAN_DENSE)
        return None
    if impl == "auto" and q.device.type == "cpu":
        if record:
            _note_cpu_auto()
        rec(site, n, _report.CPU_AUTO)
        return None
    info: dict = {}
    index = build_layer_index(q, k, key_padding, scale, patterns, budget0, budget1, last_q, block_m, impl,
                              vs_scores=vs_scores, mass=mass, info=info)
    check = max_density < 1.0
    density = None
    missed = None  # (adaptive heads short of their target, adaptive heads, those that ran the fixed choice)
    if (check or (record and _STATS is not None)) and not _capturing(q):
        # one tiny device->host read per layer (never while a CUDA graph is captured): when the
        # estimated index keeps most causal pairs (e.g. scattered slashes on unstructured attention),
        # dense SDPA is the faster kernel; the adaptive heads' missed targets come in the same read
        kept = kept_density(index, n, block_m)
        if "missed" in info:
            kept, n_missed, n_fixed = torch.stack(
                [kept, info["missed"].to(kept.dtype), info["fixed"].to(kept.dtype)]).tolist()
            missed = (int(n_missed), info["adaptive"], int(n_fixed))
        density = float(kept)
        fall_back = check and density > max_density
        if record:
            _record_stat(n, density, fall_back, missed, site)
        if fall_back:
            rec(site, n, _report.DENSITY, f"kept density {density:.3f} > max_density {max_density}", density,
                missed)
            return None
    rec(site, n, None, density=density, missed=missed)
    return index


def build_layer_index(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    patterns: Sequence[int],
    budget0: Sequence[int],
    budget1: Sequence[int],
    last_q: int = 64,
    block_m: int = 128,
    impl: str = "auto",
    vs_scores: Optional[tuple] = None,
    mass: Optional[Sequence[float]] = None,
    info: Optional[dict] = None,
):
    """The unified sparse index of one layer (all heads, their patterns mixed): estimation, top-k (or the
    mass-targeted selection for heads with ``mass[h] > 0``) and index building as the op runs them.
    ``vs_scores`` reuses a ``vertical_slash_scores`` result. ``info`` (a dict, optional) receives, for a
    layer with adaptive heads, ``adaptive`` (their count over the batch, an int) and ``missed`` (a device
    scalar: how many of them did not reach the target within the caps) and ``fixed`` (a device scalar: how
    many of those run the fixed choice, their caps holding less than ``STRUCTURE_FLOOR`` of the mass)."""
    from . import kernels as K

    n = q.shape[2]
    lp = _layer_plan(tuple(patterns), tuple(budget0), tuple(budget1), n, block_m, tuple(mass or ()))
    t = _plan_tensors(lp, q.device)
    b, h = q.shape[0], q.shape[1]
    sink0, end = sink_start(key_padding), probe_end(key_padding)
    index = None
    if lp.has_vs_like:
        if lp.has_vs:
            col, diag = vs_scores if vs_scores is not None else K.vertical_slash_scores(
                q, k, last_q=last_q, scale=scale, key_padding=key_padding, impl=impl, probe_end=end)
            caps = dict(last_q=last_q, v_max=max(lp.v_count), s_max=max(lp.s_count))
            if lp.has_adaptive_vs:
                adaptive = [i for i, m in enumerate(lp.mass) if m > 0]
                caps.update(a_v_max=max(lp.v_count[i] for i in adaptive), a_s_max=max(lp.s_count[i] for i in adaptive))
            v_idx, s_off, missed, fixed = _choice_fn(col.device)(col, diag, t["v_count"], t["s_count"], t["mass"],
                                                               t["is_adaptive"], sink0, end, **caps)
            if info is not None and lp.has_adaptive_vs:
                info["adaptive"] = b * len(adaptive)
                info["missed"], info["fixed"] = missed, fixed
        else:
            v_idx = torch.full((b, h, 1), -1, dtype=torch.int32, device=q.device)
            s_off = torch.full((b, h, 1), -1, dtype=torch.int32, device=q.device)
        if lp.has_ashape:
            rows = t["ashape_rows"]
            width = max(s_off.shape[-1], rows.shape[-1])
            s_off = torch.where(t["is_ashape"][None, :, None], _pad_last(rows, width)[None], _pad_last(s_off, width))
        index = K.build_vs_index(
            v_idx, s_off, t["n_sink"], seq_len=n, block_m=block_m, block_n=BLOCK_N,
            cap_s=lp.cap_s, cap_v=lp.cap_v, impl=impl, sink_start=sink0,
        )
    if lp.has_bs:
        blk = K.block_sparse_topk(q, k, t["top_k"], key_padding=key_padding, k_max=max(lp.top_k), impl=impl)
        bs_index = K.build_bs_index(blk, seq_len=n, block_m=block_m, block_n=BLOCK_N, cap_s=lp.cap_bs, impl=impl)
        index = bs_index if index is None else _merge_index(index, bs_index, t["is_bs"])
    return index


def sink_start(key_padding: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """int32 [B]: each row's first real key (None without padding). A left-padded row's attention sink
    (A-shape's ``n_init`` keys) is its first real tokens, not the pads in front of them."""
    if key_padding is None:
        return None
    return key_padding.to(torch.int8).argmax(-1).to(torch.int32)  # the first True (0 for a row of pads)


def probe_end(key_padding: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """int32 [B]: each row's last real query + 1 (None without padding), where the estimation's probe of
    the last queries ends: a right-padded row's last rows are pads."""
    if key_padding is None:
        return None
    n = key_padding.shape[-1]
    return (n - key_padding.to(torch.int8).flip(-1).argmax(-1)).to(torch.int32)  # n for a row of pads


def vs_choice(col, diag, v_count, s_count, mass, is_adaptive, sink0=None, end=None, *, last_q: int, v_max: int,
              s_max: int,
              a_v_max: int | None = None, a_s_max: int | None = None):
    """The vertical-slash heads' columns and diagonals: (v_idx, s_off, missed, fixed).

    MInference's fixed budgets (``vertical_slash_topk``) for every head: the plan of fixed heads, and
    the fallback of adaptive heads whose caps hold less than STRUCTURE_FLOOR of the estimated mass (too
    little structure). With ``a_v_max`` (the adaptive heads' largest caps) the adaptive selection
    (``kernels/select.py``) for the heads with ``is_adaptive``, where it is selected; ``missed`` and
    ``fixed`` (device scalars, else None) count the adaptive heads short of their target and those that
    run the fixed choice; ``sink0`` (:func:`sink_start`) is where each row's forced columns begin, ``end``
    (:func:`probe_end`) where its probe ended. Pure
    torch without host reads: the op may run it through ``torch.compile``
    (:func:`compile_index`)."""
    from .kernels import reference as R
    from .kernels.select import target_outcome, vertical_slash_select

    v_idx, s_off = R.vertical_slash_topk(col, diag, v_count, s_count, v_max=v_max, s_max=s_max, sink_start=sink0)
    if a_v_max is None:
        return v_idx, s_off, None, None
    va, sa, share = vertical_slash_select(col, diag, v_count, s_count, mass, last_q=last_q, v_max=a_v_max,
                                          s_max=a_s_max, sink_start=sink0, probe_end=end)
    reached, selected = target_outcome(share, mass)
    is_adaptive = is_adaptive[None, :]
    sel = (is_adaptive & selected)[..., None]  # [B, H, 1]
    vw, sw = max(va.shape[-1], v_idx.shape[-1]), max(sa.shape[-1], s_off.shape[-1])
    v_idx = torch.where(sel, _pad_last(va, vw), _pad_last(v_idx, vw))
    s_off = torch.where(sel, _pad_last(sa, sw), _pad_last(s_off, sw))
    return v_idx, s_off, (is_adaptive & ~reached).sum(), (is_adaptive & ~selected).sum()


_INDEX_COMPILE: dict = {"backend": None, "devices": ("cuda",), "fns": {}, "failed": {}}


def compile_index(backend: str | None = "inductor", *, devices: Sequence[str] = ("cuda",)) -> None:
    """Run the vertical-slash choice (:func:`vs_choice`: fixed top-k, adaptive selection, merge; about
    200 small torch ops for an adaptive layer, each a kernel launch and a dispatch on the host) through
    ``torch.compile(backend=backend, dynamic=True, fullgraph=True)`` for tensors on ``devices``: a few
    fused kernels. ``backend=None`` (the default state; also ``MIF_COMPILE_INDEX=0``) runs it eagerly;
    ``MIF_COMPILE_INDEX=1`` at import is ``compile_index()``. Opt-in until measured on the GPU
    (``benchmarks/profile_index.py --index-compile``). The first call per process compiles (about 15 s,
    once more for lengths that are a multiple of 64); a call inside a CUDA-graph capture must come after
    a warm-up call, as the op's other kernels do. Each new set of caps (``v_max``, ``s_max``: a plan's
    distinct budgets) compiles once more; past Dynamo's ``cache_size_limit`` the choice runs eagerly,
    the same computation. If the compile itself fails (on an H100 with torch 2.11, Inductor's tiling
    analysis asserted on the adaptive choice), one warning names the error and the choice runs eagerly
    for the rest of the process (``compile_index_failures()`` lists such errors by backend): the same
    index, never a crash in the middle of a prefill. Measured there, compiling did not pay: the fixed
    choice took 0.87 ms compiled against 0.41 ms eager (``benchmarks/results/profile_index_*_s10*``)."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"compile_index: backend must be a torch.compile backend name or None, got {backend!r}")
    _INDEX_COMPILE.update(backend=backend, devices=tuple(devices))
    if backend is not None:
        _INDEX_COMPILE["failed"].pop(backend, None)  # asked again: try the compile again


def _choice_fn(device: torch.device):
    backend = _INDEX_COMPILE["backend"]
    if backend is None or device.type not in _INDEX_COMPILE["devices"]:
        return vs_choice
    if backend in _INDEX_COMPILE["failed"]:
        return vs_choice
    fns = _INDEX_COMPILE["fns"]  # one wrapper per backend: switching back and forth compiles nothing again
    if backend not in fns:
        fns[backend] = _eager_if_compile_fails(torch.compile(vs_choice, backend=backend, dynamic=True,
                                                             fullgraph=True), backend)
    return fns[backend]


def _compile_errors() -> tuple:
    errs = [torch._dynamo.exc.TorchDynamoException]  # BackendCompilerFailed, Unsupported, ...
    try:
        from torch._inductor.exc import InductorError
        errs.append(InductorError)
    except ImportError:  # older torch: Inductor's errors arrive wrapped in BackendCompilerFailed
        pass
    return tuple(errs)


def _eager_if_compile_fails(compiled, backend: str):
    def choice(*args, **kwargs):  # _choice_fn stops handing it out once its compile failed
        try:
            return compiled(*args, **kwargs)
        except _compile_errors() as e:
            inner = getattr(e, "inner_exception", None)  # BackendCompilerFailed wraps the backend's error
            text = f"{type(inner).__name__}: {inner}" if inner is not None else str(e)
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "TORCHDYNAMO_VERBOSE" not in ln]
            err = _INDEX_COMPILE["failed"][backend] = f"{type(e).__name__}: {' '.join(lines)[:300]}"
            import warnings

            warnings.warn(f"mif_compile.ops.compile_index: torch.compile(backend={backend!r}) of the index choice "
                          f"failed ({err}); the choice runs eagerly from now on (the same index)",
                          RuntimeWarning, stacklevel=2)
            return vs_choice(*args, **kwargs)

    return choice


def compile_index_failures() -> dict:
    """{backend: the error} for each backend whose compile of the index choice failed in this process
    (the choice then runs eagerly); empty when none did."""
    return dict(_INDEX_COMPILE["failed"])


if os.environ.get("MIF_COMPILE_INDEX", "0") not in ("", "0"):
    compile_index(os.environ["MIF_COMPILE_INDEX"] if os.environ["MIF_COMPILE_INDEX"] != "1" else "inductor")


def kept_density(index, n: int, block_m: int) -> torch.Tensor:
    """Upper bound of the share of causal (query, key) pairs the index computes (device scalar)."""
    bc, _, cc, _ = index
    kept = (bc.sum(dtype=torch.float64) * BLOCK_N + cc.sum(dtype=torch.float64)) * block_m
    causal = bc.shape[0] * bc.shape[1] * n * (n + 1) / 2
    return (kept / causal).clamp(max=1.0)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


_STATS: list | None = None


def _record_stat(n: int, density: float, dense: bool, missed: tuple[int, int] | None = None,
                 site: int = -1) -> None:
    if _STATS is not None:
        row = {"seq_len": n, "density": density, "fell_back_to_dense": dense,
               "layer": _report.site_layer(site), "mode": "fixed" if missed is None else "mass"}
        if missed is not None:
            row["adaptive_heads"], row["target_missed"], row["ran_fixed"] = missed[1], missed[0], missed[2]
        _STATS.append(row)


class collect_stats:
    """``with collect_stats() as rows:`` records, per sparse layer call, a dict: ``seq_len``, the
    kept-pair ``density``, ``fell_back_to_dense`` (above ``max_density``), ``layer`` (None for a call
    made outside the backend) and ``mode``: ``"fixed"``, or ``"mass"`` for a layer with adaptive heads,
    which also has ``adaptive_heads`` (their count over the batch), ``target_missed`` (how many of
    them did not reach the mass target within the caps) and ``ran_fixed`` (how many of those ran the
    fixed choice: their caps held less than ``kernels.select.STRUCTURE_FLOOR`` of the estimated mass;
    the others kept every candidate within their caps). One host read per layer while active."""

    def __enter__(self) -> list:
        global _STATS
        self._prev, _STATS = _STATS, []
        return _STATS

    def __exit__(self, *exc) -> None:
        global _STATS
        _STATS = self._prev


def broadcast_batch(q, k, v, key_padding):
    """Expand a batch of 1 in q, k, v or key_padding to the others' batch, as SDPA broadcasts it
    (views, no copy); batch sizes that do not broadcast raise a ValueError naming them."""
    ts = [q, k, v] + ([key_padding] if key_padding is not None else [])
    sizes = [t.shape[0] for t in ts]
    b = max(sizes)
    if all(x == b for x in sizes):
        return q, k, v, key_padding
    if any(x not in (1, b) for x in sizes):
        names = ["q", "k", "v", "key_padding"]
        raise ValueError("batch sizes do not broadcast: " + ", ".join(f"{n} {x}" for n, x in zip(names, sizes)))
    q, k, v, *kp = (t.expand(b, *t.shape[1:]) for t in ts)
    return q, k, v, (kp[0] if kp else None)


@torch.library.custom_op("mif::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    patterns: list[int],
    budget0: list[int],
    budget1: list[int],
    min_seq_len: int,
    last_q: int,
    block_m: int,
    impl: str,
    max_density: float,
    mass: Optional[list[float]] = None,
    site: int = -1,
) -> torch.Tensor:
    """Causal prefill attention of one layer with a per-head MInference plan (see :func:`run_layer`);
    ``mass``: per-head targets of the adaptive index (0.0 or None: fixed budgets).

    q, k: [B, H(kv), N, D]; v: [B, Hkv, N, Dv] -> [B, H, N, Dv]; a batch of 1 broadcasts as in SDPA.
    Differentiable (see :func:`layer_grads`)."""
    q, k, v, key_padding = broadcast_batch(q, k, v, key_padding)
    return run_layer(q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q, block_m, impl,
                     max_density, mass, site)


def _out_batch(q, k, v):
    # batch 1 is static under Dynamo (0/1 specialisation), so these tests never guard on a symbol
    return next((t.shape[0] for t in (q, k, v) if t.shape[0] != 1), 1)


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q, block_m, impl,
                           max_density, mass=None, site=-1):
    # contiguous, like the real op's output
    return q.new_empty(_out_batch(q, k, v), q.shape[1], q.shape[2], v.shape[-1])


# ---------------------------------------------------------------------------------------------
# backward


_GRAD_ROWS = 4096  # query rows per recomputation chunk of the sparse backward


def layer_grads(grad, q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q=64,
                block_m=128, impl="auto", max_density=1.0, mass=None):
    """(dq, dk, dv) of :func:`run_layer`'s output for the output gradient ``grad``.

    Recomputes what the forward computed, through differentiable PyTorch, a chunk of query rows at
    a time (rows are independent given q, k, v), so memory stays that of one chunk: dense SDPA when
    the forward ran dense (its own backward without padding; the padded path's chunks with padding),
    else the pure-PyTorch sparse attention over the same index (:func:`sparse_index` rebuilds it from
    the same q and k; the Triton forward computes the same function).
    Caveat: under CUDA-graph capture the forward skips the ``max_density`` check; a backward outside
    the capture makes it, and would differentiate dense SDPA for a layer that ran sparse.
    """
    from .kernels import reference as R

    b_in = (q.shape[0], k.shape[0], v.shape[0])
    q, k, v, key_padding = broadcast_batch(q, k, v, key_padding)
    # the forward's own run-time choices, made again on the same inputs
    q, k, v, key_padding, patterns, budget0, budget1, mass, top_left = _run_time_guard(
        q, k, v, key_padding, patterns, budget0, budget1, mass)
    B, H, N, _ = q.shape
    index = None
    if not top_left:
        with torch.no_grad():
            index = sparse_index(q, k, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q, block_m,
                                 impl, max_density, mass, record=False)
    if top_left:
        chunks = [(0, N, lambda qc, kl, vl: _top_left_causal(qc, kl, vl, key_padding, scale))]
    elif index is None and key_padding is None:
        chunks = [(0, N, lambda qc, kl, vl: F.scaled_dot_product_attention(
            qc, kl, vl, is_causal=True, scale=scale, enable_gqa=H != kl.shape[1]))]
    elif index is None:
        chunks = [(r0, r1, functools.partial(_dense_chunk, r0=r0, r1=r1, key_end=ke, kp=key_padding, scale=scale))
                  for r0, r1, ke in dense_chunks(B, N)]
    else:
        per = max(1, _GRAD_ROWS // block_m)
        nm = math.ceil(N / block_m)
        chunks = [(m * block_m, min(N, (m + per) * block_m),
                   functools.partial(R.sparse_attention_blocks, index=index, m_lo=m, m_hi=min(nm, m + per),
                                     scale=scale, block_m=block_m, block_n=BLOCK_N, key_padding=key_padding))
                  for m in range(0, nm, per)]
    kl, vl = k.detach().requires_grad_(), v.detach().requires_grad_()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32 if k.dtype != torch.float64 else k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=dk.dtype, device=v.device)
    for r0, r1, fn in chunks:
        qc = q[:, :, r0:r1].detach().requires_grad_()
        with _autograd_on(), torch.enable_grad():
            out = fn(qc, kl, vl)
            gq, gk, gv = torch.autograd.grad(out, (qc, kl, vl), grad[:, :, r0:r1], allow_unused=True)
        dq[:, :, r0:r1] = gq if gq is not None else 0
        if gk is not None:
            dk += gk
        if gv is not None:
            dv += gv
    grads = [dq, dk.to(k.dtype), dv.to(v.dtype)]
    # a broadcast batch of 1 gets the sum over the batch
    return tuple((g.sum(0, keepdim=True) if b == 1 and B > 1 else g).contiguous() for g, b in zip(grads, b_in))


def _autograd_on():
    """Re-enable autograd dispatch inside a custom op's implementation, which runs below the
    Autograd key (``_AutoDispatchBelowAutograd``): the backward differentiates its recomputation
    with torch.autograd. A no-op outside an op."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(C.DispatchKey.AutogradFunctionality).remove(C.DispatchKey.ADInplaceOrView)
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude)


def _dense_chunk(qc, kl, vl, *, r0, r1, key_end, kp, scale):
    return dense_rows(qc, kl, vl, kp, scale, r0, r1, key_end)


@torch.library.custom_op("mif::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    patterns: list[int],
    budget0: list[int],
    budget1: list[int],
    min_seq_len: int,
    last_q: int,
    block_m: int,
    impl: str,
    max_density: float,
    mass: Optional[list[float]] = None,
    site: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``mif::sparse_attention`` (see :func:`layer_grads`): an op of its own, so
    AOTAutograd traces the backward graph without running data-dependent code on fake tensors."""
    return layer_grads(grad, q, k, v, key_padding, scale, patterns, budget0, budget1, min_seq_len, last_q,
                       block_m, impl, max_density, mass)


@sparse_attention_backward.register_fake
def _sparse_attention_backward_fake(grad, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, like the real op's


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding = inputs[:4]
    ctx.save_for_backward(q, k, v, key_padding)
    ctx.args = inputs[4:]


def _backward(ctx, grad):
    q, k, v, key_padding = ctx.saved_tensors
    dq, dk, dv = torch.ops.mif.sparse_attention_backward(grad.contiguous(), q, k, v, key_padding, *ctx.args)
    return (dq, dk, dv) + (None,) * (len(ctx.args) + 1)  # key_padding and the non-tensor arguments


sparse_attention.register_autograd(_backward, setup_context=_setup_context)

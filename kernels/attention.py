"""Triton sparse attention over the unified index (contract section 4).

One launch for every (query block, batch * head). Each program loads its BLOCK_M queries once
and runs an exp2 online softmax (scale folded into the exponent) over three loops:
  1. key blocks that lie entirely at or left of the first query row: no masks at all;
  2. the last BLOCK_M // BLOCK_N + 1 blocks, the only ones that can reach past m0 (blocks are
     disjoint and ascending): causal mask and bounds mask;
  3. single columns, gathered BLOCK_N at a time (all < m0, so no causal mask).
GQA is native: head h reads kv head h // (H // Hkv). Query blocks are launched longest first.
With ``pair=True`` loops 1 and 3 take two index blocks (two gathers of BLOCK_N columns) per step as one
2 * BLOCK_N-key tile: a larger tile per online-softmax update and per matmul, the same keys (an odd
last block of loop 1 runs alone). With ``fold=True`` the scale goes into the exponent's FMA (the
scores stay raw until then). With ``tma=True`` loop 1's blocks (BLOCK_N contiguous keys each) are read
through host-made tensor descriptors (Hopper's bulk copy engine) instead of pointer loads (with
``pair``: two loads and two matmuls under one online-softmax update), and falls back to pointers where
a descriptor cannot describe k/v (a padded head dim, strides or bases not 16-byte aligned). All three
are on by default at block_m 128 and head dim 128 (``PAIR``, ``FOLD``, ``TMA``: 16-22% faster on an
H100), off elsewhere (block_m 64: measured slower; other head dims: not measured). Two more launch
options, off by default and not yet measured: ``band_tma`` (loop 2 through the descriptors too) and
``cols`` (columns gathered a step in loop 3).
q/k and v may have different head dims (MLA: 192 and 128); each is padded to a power of two
(HEAD_DIM, HEAD_DIM_V, at least 16 for tl.dot) with masked loads, dropped when the dims are even.
NaN/inf propagate as in dense attention: masked scores are replaced by -inf, never added to.
Blocks are not 64-aligned (slash runs start anywhere): a descriptor takes any row offset, and rows past
N read as zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, qk_scale, FOLD: tl.constexpr):
    # FOLD: the raw q k^T, scaled later inside the exponent (one FMA an element); else in the log2 domain
    if FOLD:
        return tl.dot(q, k)
    else:
        return tl.dot(q, k) * qk_scale


@triton.jit
def _running_max(m_i, top, qk_scale, FOLD: tl.constexpr):
    # the new running row max from ``top`` (this step's raw row max), and the max to subtract (0 where a
    # row has seen only masked keys, so that exp2 gives 0 rather than NaN)
    if FOLD:
        m_new = tl.maximum(m_i, top * qk_scale)
    else:
        m_new = tl.maximum(m_i, top)
    return m_new, tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def _exp(qk, m_use, qk_scale, FOLD: tl.constexpr):
    if FOLD:
        return tl.math.exp2(qk * qk_scale - m_use[:, None])
    else:
        return tl.math.exp2(qk - m_use[:, None])


@triton.jit
def _online_update(acc, l_i, m_i, qk, v, qk_scale, FOLD: tl.constexpr):
    # qk: [BM, BN] in the log2 domain (FOLD: raw, scaled here inside the exponent), -inf where masked;
    # a row may be fully masked
    m_new, m_use = _running_max(m_i, tl.max(qk, 1), qk_scale, FOLD)
    p = _exp(qk, m_use, qk_scale, FOLD)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _load_2d(ptrs, ok0, ok1, MASK0: tl.constexpr, MASK1: tl.constexpr):
    # tile load, 0 where masked; ok0 masks axis 0 and ok1 axis 1, each only when its flag is set
    if MASK0:
        if MASK1:
            x = tl.load(ptrs, mask=ok0[:, None] & ok1[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=ok0[:, None], other=0.0)
    else:
        if MASK1:
            x = tl.load(ptrs, mask=ok1[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _off_band_tile(acc, l_i, m_i, q, cols, k_base, v_base, pad_base, stride_kn, stride_vn, offs_d, offs_dv, d_ok,
                   dv_ok, qk_scale, PAD_D: tl.constexpr, PAD_DV: tl.constexpr, HAS_PADDING: tl.constexpr,
                   FOLD: tl.constexpr):
    # one tile of keys ``cols`` that are all < N and <= every query of the block: no causal or bounds mask
    c64 = cols.to(tl.int64)
    k = _load_2d(k_base + c64[None, :] * stride_kn + offs_d[:, None], d_ok, cols, PAD_D, False)
    v = _load_2d(v_base + c64[:, None] * stride_vn + offs_dv[None, :], cols, dv_ok, False, PAD_DV)
    qk = _scores(q, k, qk_scale, FOLD)
    if HAS_PADDING:
        real = tl.load(pad_base + cols)
        qk = tl.where(real[None, :] != 0, qk, float("-inf"))
    return _online_update(acc, l_i, m_i, qk, v, qk_scale, FOLD)


@triton.jit
def _desc_k(k_desc, b32, hk32, start, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    # keys start .. start + BLOCK_N - 1 of a [B, Hkv, N, D] descriptor as a [D, BLOCK_N] tile (rows past N: 0)
    return tl.trans(k_desc.load([b32, hk32, start, 0]).reshape(BLOCK_N, HEAD_DIM))


@triton.jit
def _desc_v(v_desc, b32, hk32, start, BLOCK_N: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    return v_desc.load([b32, hk32, start, 0]).reshape(BLOCK_N, HEAD_DIM_V)


@triton.jit
def _off_band_tile_tma(acc, l_i, m_i, q, start, offs_n, k_desc, v_desc, b32, hk32, pad_base, qk_scale,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       HAS_PADDING: tl.constexpr, FOLD: tl.constexpr):
    # _off_band_tile on keys start .. start + BLOCK_N - 1 read through descriptors of [B, Hkv, N, D] k and v
    k = _desc_k(k_desc, b32, hk32, start, BLOCK_N, HEAD_DIM)
    v = _desc_v(v_desc, b32, hk32, start, BLOCK_N, HEAD_DIM_V)
    qk = _scores(q, k, qk_scale, FOLD)
    if HAS_PADDING:
        real = tl.load(pad_base + start + offs_n)
        qk = tl.where(real[None, :] != 0, qk, float("-inf"))
    return _online_update(acc, l_i, m_i, qk, v, qk_scale, FOLD)


@triton.jit
def _off_band_pair_tma(acc, l_i, m_i, q, start_a, start_b, offs_n, k_desc, v_desc, b32, hk32, pad_base, qk_scale,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       HAS_PADDING: tl.constexpr, FOLD: tl.constexpr):
    # two off-band blocks through descriptors: [BM, BN] scores each, one shared running max and rescale
    ka = _desc_k(k_desc, b32, hk32, start_a, BLOCK_N, HEAD_DIM)
    kb = _desc_k(k_desc, b32, hk32, start_b, BLOCK_N, HEAD_DIM)
    qa = _scores(q, ka, qk_scale, FOLD)
    qb = _scores(q, kb, qk_scale, FOLD)
    if HAS_PADDING:
        qa = tl.where(tl.load(pad_base + start_a + offs_n)[None, :] != 0, qa, float("-inf"))
        qb = tl.where(tl.load(pad_base + start_b + offs_n)[None, :] != 0, qb, float("-inf"))
    m_new, m_use = _running_max(m_i, tl.maximum(tl.max(qa, 1), tl.max(qb, 1)), qk_scale, FOLD)
    pa = _exp(qa, m_use, qk_scale, FOLD)
    pb = _exp(qb, m_use, qk_scale, FOLD)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(pa, 1) + tl.sum(pb, 1)
    va = _desc_v(v_desc, b32, hk32, start_a, BLOCK_N, HEAD_DIM_V)
    vb = _desc_v(v_desc, b32, hk32, start_b, BLOCK_N, HEAD_DIM_V)
    acc = tl.dot(pa.to(va.dtype), va, acc * alpha[:, None])
    acc = tl.dot(pb.to(vb.dtype), vb, acc)
    return acc, l_i, m_new


@triton.jit
def _sparse_attn_kernel(
    Q, K, V, Out, BC, BO, CC, CI, PAD, K_DESC, V_DESC,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    qk_scale, N, H, NM, cap_s, cap_v,
    GROUPS: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, HAS_PADDING: tl.constexpr,
    PAIR: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr, BAND_TMA: tl.constexpr, COLS: tl.constexpr,
):
    m = NM - 1 - tl.program_id(0)  # longest rows first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit bases: q alone has > 2**31 elements at 1M tokens
    h = (bh % H).to(tl.int64)
    hk = h // GROUPS
    m0 = m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    d_ok = offs_d < D_QK
    dv_ok = offs_dv < D_V
    row_ok = offs_m < N
    # row and key offsets times a stride are 64-bit too: in the [B, N, H, D] layout of a transposed view
    # (what transformers passes) stride_qn is H * D, and 1M rows x 4096 overflow int32
    rows64 = offs_m.to(tl.int64)

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qn + offs_d[None, :]
    if EVEN_M:
        q = _load_2d(q_ptrs, row_ok, d_ok, False, PAD_D)
    else:
        q = _load_2d(q_ptrs, row_ok, d_ok, True, PAD_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    pad_base = PAD + b * N

    row = bh * NM + m
    n_blk = tl.load(BC + row)
    n_col = tl.load(CC + row)
    bo_ptr = BO + row.to(tl.int64) * cap_s
    ci_ptr = CI + row.to(tl.int64) * cap_v

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)

    n_full = tl.maximum(n_blk - (BLOCK_M // BLOCK_N + 1), 0)
    # 1. off-band blocks: every key < N and <= every query of the block
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    if PAIR:  # two blocks a step as one tile of 2 * BLOCK_N gathered keys
        n_pairs = n_full // 2
        offs_t = tl.arange(0, 2 * BLOCK_N)
        second = offs_t >= BLOCK_N
        within = offs_t % BLOCK_N
        for i in range(0, n_pairs):
            start_a = tl.load(bo_ptr + 2 * i)
            start_b = tl.load(bo_ptr + 2 * i + 1)
            if TMA:  # two descriptor loads and two matmuls, one online-softmax update
                acc, l_i, m_i = _off_band_pair_tma(acc, l_i, m_i, q, start_a, start_b, offs_n, K_DESC, V_DESC,
                                                   b32, hk32, pad_base, qk_scale, BLOCK_N, HEAD_DIM, HEAD_DIM_V,
                                                   HAS_PADDING, FOLD)
            else:
                cols = tl.where(second, start_b, start_a) + within
                acc, l_i, m_i = _off_band_tile(acc, l_i, m_i, q, cols, k_base, v_base, pad_base, stride_kn,
                                               stride_vn, offs_d, offs_dv, d_ok, dv_ok, qk_scale, PAD_D, PAD_DV,
                                               HAS_PADDING, FOLD)
        first_single = 2 * n_pairs
    else:
        first_single = 0
    if TMA:
        for i in range(first_single, n_full):
            start = tl.load(bo_ptr + i)
            acc, l_i, m_i = _off_band_tile_tma(acc, l_i, m_i, q, start, offs_n, K_DESC, V_DESC, b32, hk32,
                                               pad_base, qk_scale, BLOCK_N, HEAD_DIM, HEAD_DIM_V, HAS_PADDING,
                                               FOLD)
    else:
        for i in range(first_single, n_full):
            start = tl.load(bo_ptr + i)
            cols = start + offs_n
            acc, l_i, m_i = _off_band_tile(acc, l_i, m_i, q, cols, k_base, v_base, pad_base, stride_kn,
                                           stride_vn, offs_d, offs_dv, d_ok, dv_ok, qk_scale, PAD_D, PAD_DV,
                                           HAS_PADDING, FOLD)
    # 2. blocks that may reach past m0 or past N: causal + bounds masks
    for i in range(n_full, n_blk):
        start = tl.load(bo_ptr + i)
        cols = start + offs_n
        in_n = cols < N
        if BAND_TMA:  # through the descriptors too: rows past N read as zeros (and are masked below)
            k = _desc_k(K_DESC, b32, hk32, start, BLOCK_N, HEAD_DIM)
            v = _desc_v(V_DESC, b32, hk32, start, BLOCK_N, HEAD_DIM_V)
        else:
            c64 = cols.to(tl.int64)
            k = _load_2d(k_base + c64[None, :] * stride_kn + offs_d[:, None], d_ok, in_n, PAD_D, True)
            v = _load_2d(v_base + c64[:, None] * stride_vn + offs_dv[None, :], in_n, dv_ok, True, PAD_DV)
        qk = _scores(q, k, qk_scale, FOLD)
        ok = (cols[None, :] <= offs_m[:, None]) & in_n[None, :]
        if HAS_PADDING:
            real = tl.load(pad_base + cols, mask=in_n, other=0)
            ok = ok & (real[None, :] != 0)
        qk = tl.where(ok, qk, float("-inf"))
        acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, qk_scale, FOLD)
    # 3. single columns, COLS at a time (BLOCK_N, or 2 * BLOCK_N with PAIR, unless told); all lie left of m0
    offs_c = tl.arange(0, COLS)
    for c0 in range(0, n_col, offs_c.shape[0]):
        live = (c0 + offs_c) < n_col
        cols = tl.load(ci_ptr + c0 + offs_c, mask=live, other=0)
        c64 = cols.to(tl.int64)
        k = _load_2d(k_base + c64[None, :] * stride_kn + offs_d[:, None], d_ok, live, PAD_D, True)
        v = _load_2d(v_base + c64[:, None] * stride_vn + offs_dv[None, :], live, dv_ok, True, PAD_DV)
        qk = _scores(q, k, qk_scale, FOLD)
        ok = live
        if HAS_PADDING:
            ok = ok & (tl.load(pad_base + cols, mask=live, other=0) != 0)
        qk = tl.where(ok[None, :], qk, float("-inf"))
        acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, qk_scale, FOLD)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows64[:, None] * stride_on + offs_dv[None, :]
    if EVEN_M:
        if PAD_DV:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=dv_ok[None, :])
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


def _pow2(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def default_config(block_m: int, head_dim: int) -> tuple[int, int]:
    """(num_warps, num_stages) for Hopper; the interpreter ignores both."""
    if block_m == 128:
        return (8, 3) if head_dim >= 64 else (4, 3)
    return 4, 3


# Whether launches at block_m 128 and head dim 128 pair index blocks into 2 * block_n-key tiles, fold the
# softmax scale into the exponent (one FMA an element instead of a multiply and a subtract) and read
# off-band blocks through descriptors, when not told (module docstring). Measured on an H100
# (benchmarks/NOTES.md, session 12): the three together 16-22% faster at block_m 128, d 128 on the op's
# index; at block_m 64 pairing was 4-25% slower, so block_m 64 keeps single pointer-loaded tiles, and so
# do other head dims (not measured; at d 256 a paired tile doubles shared memory that single tiles fill).
PAIR = True
FOLD = True
TMA = True


def launch_options(block_m: int, hd: int, hdv: int, pair=None, fold=None, tma=None) -> tuple[bool, bool, bool]:
    """(pair, fold, tma) of a launch: what the caller passed, else the module defaults where they were
    measured (block_m 128, padded head dims 128), else off."""
    tuned = block_m == 128 and hd == hdv == 128
    return tuple(bool(given) if given is not None else (default and tuned)
                 for given, default in ((pair, PAIR), (fold, FOLD), (tma, TMA)))


def _cols(cols, pair: bool, block_n: int) -> int:
    if cols is None:
        return 2 * block_n if pair else block_n
    if cols not in (16, 32, 64, 128, 256):
        raise ValueError(f"sparse_attention: cols={cols!r}, columns gathered a step, must be one of 16, 32, 64, 128, "
                         "256")
    return cols


def _descriptors(k, v, block_n, hd, hdv):
    """Tensor descriptors of k and v for loop 1 ([1, 1, block_n, D] boxes), or None where one cannot
    describe them: a padded head dim, a stride or base not 16-byte aligned, or no descriptor support."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - older Triton
        return None
    if hd != k.shape[-1] or hdv != v.shape[-1]:
        return None
    for t in (k, v):
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return None
    return (TensorDescriptor.from_tensor(k, [1, 1, block_n, hd]),
            TensorDescriptor.from_tensor(v, [1, 1, block_n, hdv]))


def sparse_attention(q, k, v, index, *, scale, block_m, block_n=64, key_padding=None,
                     num_warps=None, num_stages=None, pair=None, fold=None, tma=None, band_tma=False, cols=None):
    """Launcher; inputs are validated by mif_compile.kernels.api. Returns out [B, H, N, Dv].
    ``num_warps`` / ``num_stages``: default :func:`default_config`; ``pair`` / ``fold`` / ``tma``: default
    ``PAIR`` / ``FOLD`` / ``TMA`` at block_m 128 and head dim 128, else off (module docstring).
    ``band_tma``: loop 2's blocks through the descriptors too (with ``tma``); ``cols``: columns gathered a
    step in loop 3 (default ``2 * block_n`` with ``pair``, else ``block_n``). Both unmeasured options: an
    offline sm_90 compile (benchmarks/kernel_resources.py) shows that they remove the register spills of
    the default launch."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    groups = H // k.shape[1]
    NM = math.ceil(N / block_m)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bc, bo, cc, ci = (t.contiguous() for t in index)
    out = torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
    pad = key_padding.to(torch.int8).contiguous() if key_padding is not None else bc
    hd, hdv = _pow2(D), _pow2(Dv)
    w, s = default_config(block_m, max(hd, hdv))
    pair, fold, tma = launch_options(block_m, hd, hdv, pair, fold, tma)
    descs = _descriptors(k, v, block_n, hd, hdv) if tma else None
    use_tma = descs is not None
    grid = (NM, B * H)
    _sparse_attn_kernel[grid](
        q, k, v, out, bc, bo, cc, ci, pad, *(descs if use_tma else (k, v)),  # (k, v): unused without TMA
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        scale * _LOG2E, N, H, NM, bo.shape[-1], ci.shape[-1],  # caps are run-time values: no compile per length
        GROUPS=groups, D_QK=D, D_V=Dv, HEAD_DIM=hd, HEAD_DIM_V=hdv, PAD_D=hd != D, PAD_DV=hdv != Dv,
        BLOCK_M=block_m, BLOCK_N=block_n, EVEN_M=(N % block_m == 0), HAS_PADDING=key_padding is not None,
        PAIR=pair, FOLD=fold, TMA=use_tma, BAND_TMA=bool(band_tma) and use_tma,
        COLS=_cols(cols, pair, block_n),
        num_warps=num_warps or w, num_stages=num_stages or s,
        enable_fp_fusion=True,  # as measured (triton 3.6's default; triton 3.10 turns it off)
    )
    return out

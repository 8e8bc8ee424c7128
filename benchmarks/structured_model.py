"""A random-weight Llama whose every attention layer has real-model-like structure (issue 11).

Random weights give attention without structure: the estimated index keeps most pairs and the op
falls back to dense, so a whole-model benchmark on them measures only the never-slower case.
``structure_llama(model)`` edits a HF ``LlamaForCausalLM`` in place so that each layer's q and k
are those of benchmarks/structured.py (local window, slashes, sink, heavy keys), made by the
model's own RMSNorm, projections and RoPE. How:
1. Three kinds of directions of the hidden state, orthonormal, drawn by ``seed``: ``u`` (every
   token), ``u_s`` (the sink token, put at position 0 by :func:`structured_ids`) and one ``u_g`` per
   kv head (its marked token ids, the heavy keys). The embedding of every token gets ``64 * u``
   on top of its random row; the sink token and each group's marked ids add ``64 * u_s`` / ``64 * u_g``.
   After RMSNorm an ordinary token is ~ sqrt(hidden) * u, a sink or marked one sqrt(hidden / 2) *
   (u + u_s) (resp. u_g).
2. Each layer's q_proj / k_proj = 0.05 * its random weights + rank-one maps that send u to the
   structured a_h (queries) and b_g (keys) of a per-layer :class:`structured.Structure`, u_s to the
   sink key's extra component, u_g to the heavy keys' (with the 1/sqrt(2) of RMSNorm compensated).
   RoPE then rotates them exactly as the generator does (same pair layout and frequencies); the
   vertical pairs are the 4 lowest-frequency pairs, phase-centred at ``centre`` tokens (their
   frequencies are not 0 here: at theta 500000 they turn by up to 2.4 rad over 512K positions, so
   the sink's and heavy keys' logits vary by a cosine factor >= ~0.4 within +- 384K of the centre).
3. o_proj and down_proj are scaled by 0.01 so the 32 residual updates do not drown ``u``.
Values, MLP, norms and the LM head stay random: the model computes nonsense, fast, with the
attention of a trained model's long-context layers. Structure amplitudes follow ln(ref_len).
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from structured import MIXES, head_vectors, make_structure, rope_freqs  # noqa: E402

GAMMA = 64.0  # norm of the structure directions in the embeddings
N_ZERO = 4  # vertical pairs: the lowest-frequency ones


def _complex(x):  # [.., D] (rotate_half layout) -> [.., D/2] complex
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half], x[..., half:])


def _real(z):
    return torch.cat([z.real, z.imag], -1)


@torch.no_grad()
def structure_llama(model, *, mix: str = "mixed", seed: int = 0, ref_len: int = 262144, centre: int = 131072,
                    marked_per_group: int = 4, sink_id: int | None = None) -> dict:
    """Edit ``model`` (LlamaForCausalLM, random weights) in place; returns the token ids to use with
    :func:`structured_ids`: ``dict(sink_id, marked=[ids per kv head], mix, n_heavy)``."""
    cfg = model.config
    hidden, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or hidden // heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    vocab = cfg.vocab_size
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)}, got {mix!r}")
    if 2 + kv > hidden:
        raise ValueError(f"hidden size {hidden} too small for {2 + kv} structure directions")
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    dev = emb.device
    dirs, _ = torch.linalg.qr(torch.randn(hidden, 2 + kv, generator=gen, dtype=torch.float64))
    dirs = dirs.to(dev)
    u, u_s, u_g = dirs[:, 0], dirs[:, 1], dirs[:, 2:].T  # [hidden], [hidden], [kv, hidden]
    perm = torch.randperm(vocab, generator=gen)
    sink_id = int(perm[0]) if sink_id is None else sink_id
    rest = perm[perm != sink_id]
    marked = [rest[g * marked_per_group:(g + 1) * marked_per_group].tolist() for g in range(kv)]

    e = emb.double()
    e += GAMMA * u
    e[sink_id] += GAMMA * u_s
    for g, ids in enumerate(marked):
        e[ids] += GAMMA * u_g[g]
    emb.copy_(e.to(emb.dtype))

    w = rope_freqs(d, theta, 0)  # the model's true frequencies
    vpairs = torch.arange(d // 2) >= d // 2 - N_ZERO
    phase = torch.where(vpairs, torch.exp(-1j * w * centre), torch.ones(d // 2, dtype=torch.complex128)).to(dev)
    s0, s1 = math.sqrt(hidden), math.sqrt(hidden / 2)
    c = 1 - 1 / math.sqrt(2)  # RMSNorm shrinks u by 1/sqrt(2) on sink and marked tokens
    for li, layer in enumerate(model.model.layers):
        st = make_structure(mix, heads=heads, kv_heads=kv, seq_len=ref_len, head_dim=d, seed=seed * 1000 + li + 1)
        a, b, b_sink, b_heavy = (t.to(dev) for t in head_vectors(st, heads, kv, d, theta, N_ZERO))
        a = _real(_complex(a) * phase)  # vertical pairs: conj(a) b = c exp(1j w centre)
        at = layer.self_attn
        wq = 0.05 * at.q_proj.weight.double()  # [H * D, hidden]
        wk = 0.05 * at.k_proj.weight.double()  # [Hkv * D, hidden]
        qa = a.reshape(-1)  # [H * D]
        wq += torch.outer(qa, u) / s0 + torch.outer(qa * c, u_s + u_g.sum(0)) / s1
        for g in range(kv):
            rows = slice(g * d, (g + 1) * d)
            wk[rows] += torch.outer(b[g], u) / s0 + torch.outer(b[g] * c + b_sink, u_s) / s1
            for g2 in range(kv):
                extra = b_heavy if g2 == g else torch.zeros_like(b_heavy)
                wk[rows] += torch.outer(b[g] * c + extra, u_g[g2]) / s1
        at.q_proj.weight.copy_(wq.to(at.q_proj.weight.dtype))
        at.k_proj.weight.copy_(wk.to(at.k_proj.weight.dtype))
        at.o_proj.weight.mul_(0.01)
        layer.mlp.down_proj.weight.mul_(0.01)
    return dict(sink_id=sink_id, marked=marked, mix=mix, n_heavy=MIXES[mix]["n_heavy"])


def structured_ids(n: int, info: dict, vocab: int, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """[1, n] token ids: the sink token at position 0, each kv head's marked ids at ``n_heavy`` random
    positions, ordinary random ids elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor([info["sink_id"], *[i for ids in info["marked"] for i in ids]])
    ids = torch.randint(0, vocab, (n,), generator=gen)
    bad = torch.isin(ids, special)
    ids[bad] = (ids[bad] + 1 + special.max()) % vocab  # a few collisions; retry once
    ids[torch.isin(ids, special)] = int(torch.arange(vocab)[~torch.isin(torch.arange(vocab), special)][0])
    pos = torch.randperm(n - 1, generator=gen)[: info["n_heavy"] * len(info["marked"])] + 1
    for g, ids_g in enumerate(info["marked"]):
        p = pos[g * info["n_heavy"]:(g + 1) * info["n_heavy"]]
        ids[p] = torch.tensor(ids_g)[torch.arange(len(p)) % len(ids_g)]
    ids[0] = info["sink_id"]
    return ids[None].to(device)


@torch.no_grad()
def capture_qk(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (q [B, H, N, D], k [B, Hkv, N, D]) after RoPE, as the model's attention sees them
    (hooks on q_proj / k_proj, then the model's own rotary embedding and apply_rotary_pos_emb)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    got, hooks = {}, []
    for li, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda mod, inp, out, key=(li, name): got.__setitem__(key, out)))
    try:
        model(ids, logits_to_keep=1, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    b, n = ids.shape
    pos = torch.arange(n, device=ids.device)[None]
    cos, sin = model.model.rotary_emb(got[(0, "q_proj")], pos)
    out = []
    for li in range(len(model.model.layers)):
        q = got[(li, "q_proj")].view(b, n, -1, d).transpose(1, 2)
        k = got[(li, "k_proj")].view(b, n, -1, d).transpose(1, 2)
        out.append(apply_rotary_pos_emb(q, k, cos, sin))
    return out

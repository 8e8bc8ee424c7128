"""Tiny random-weight Hugging Face models and an eager reference attention for backend tests.

``use_reference_attention(model, plan)`` swaps the model's attention for one that calls the same
run-time function as the custom op (``mif_compile.ops.run_layer``) eagerly, outside torch.compile:
it is the oracle the compiled model must reproduce.
"""

from __future__ import annotations

import torch
from transformers import (AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mif_compile.config import BackendConfig
from mif_compile.ops import encode_heads, run_layer

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**_COMMON, **overrides})
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**_COMMON, "num_attention_heads": 4, "num_key_value_heads": 1, **overrides})
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(seed: int = 0, **overrides) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(**{**_COMMON, "sliding_window": None, **overrides})
    cfg._attn_implementation = "sdpa"
    return MistralForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """GPT-2 reshapes its padding mask with ``.view(batch, -1)`` before building the causal mask."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**{"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 4096, **overrides})
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}

_CURRENT: dict = {}


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cfg: BackendConfig = _CURRENT["cfg"]
    heads = cfg.plan.heads_for(module.layer_idx, query.shape[1])
    codes, b0, b1 = encode_heads(heads)
    padding = None
    if attention_mask is not None:
        assert attention_mask.dtype == torch.bool
        padding = attention_mask[:, 0, -1, :].clone()  # the last query row sees every real key
    if query.shape[2] != key.shape[2]:  # decode: dense with the given mask, as the model would
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = run_layer(query, key, value, padding, scaling, codes, b0, b1, cfg.min_seq_len, cfg.last_q, cfg.block_m, "reference",
                    cfg.max_density)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("mif_reference", _reference_attention)
AttentionMaskInterface.register("mif_reference", sdpa_mask)


def use_reference_attention(model, cfg: BackendConfig):
    """Make ``model`` run the reference sparse path eagerly (returns the model)."""
    _CURRENT["cfg"] = cfg
    model.config._attn_implementation = "mif_reference"
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "mif_reference"
    return model


def _reference_snapkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The eager reference attention, and after a prefill the SnapKV compression of the layer's cache
    by the dense float64 oracle (tests/kernels/_oracle.py), written into ``_CURRENT["cache"]``."""
    from tests.kernels._oracle import snapkv_reference

    out = _reference_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    cfg: BackendConfig = _CURRENT["cfg"]
    n = key.shape[2]
    if query.shape[2] == n and n > 1:
        padding = attention_mask[:, 0, -1, :].clone() if attention_mask is not None else None
        pads = 0 if padding is None else int((~padding).sum(1).max())
        keep = min(n, cfg.kv_budget + pads)
        if keep < n:
            idx = snapkv_reference(query, key, keep=keep, window=cfg.kv_window_used, pool=cfg.kv_pool_used,
                                   scale=scaling, key_padding=padding)
            layer = _CURRENT["cache"].layers[module.layer_idx]
            layer.keys = key.gather(2, idx[..., None].expand(-1, -1, -1, key.shape[-1]))
            layer.values = value.gather(2, idx[..., None].expand(-1, -1, -1, value.shape[-1]))
            _CURRENT["kept"][module.layer_idx] = idx
    return out


AttentionInterface.register("mif_reference_snapkv", _reference_snapkv_attention)
AttentionMaskInterface.register("mif_reference_snapkv", sdpa_mask)


def use_reference_snapkv(model, cfg: BackendConfig, cache):
    """Make ``model`` run the reference sparse path eagerly and compress ``cache`` (a DynamicCache the
    caller passes to generate) after each layer's prefill as SnapKV says; the kept positions of each
    layer go to the returned dict (layer -> [B, Hkv, K])."""
    _CURRENT.update(cfg=cfg, cache=cache, kept={})
    for m in [model, *model.modules()]:
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "mif_reference_snapkv"
    return _CURRENT["kept"]

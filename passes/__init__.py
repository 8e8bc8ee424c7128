"""Graph passes of the minference backend (installed as ``mif_compile.passes``)."""

from .mask import MaskProof, prove_causal_mask
from .sdpa import KvCompression, SdpaRewrite, Site, is_sdpa, layer_index, rewrite_sdpa

__all__ = ["KvCompression", "MaskProof", "prove_causal_mask", "SdpaRewrite", "Site", "is_sdpa", "layer_index", "rewrite_sdpa"]

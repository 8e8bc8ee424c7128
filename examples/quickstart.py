"""Compile a small random-weight Llama with the minference backend and prefill a long prompt.

    python examples/quickstart.py                 # CPU: 4K tokens; the op runs dense SDPA on CPU
    python examples/quickstart.py --impl reference  # CPU: the sparse path in pure PyTorch (slow)
    python examples/quickstart.py --seq-len 131072  # on a GPU: bf16 through the Triton kernels

Prints which attention sites were rewritten, what each of them ran at run time (sparse, or dense and
why: CPU with impl="auto", below min_seq_len, estimated density above max_density), the error of the
logits against dense, and the prefill time of both. The weights are random, so attention is diffuse and sparse patterns drop real
mass: expect a visible error here, unlike on trained models whose attention is sparse.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mif_compile


def build_model(device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 20)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def model_and_prompt(device: str, seq_len: int | None, gpu_len: int) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """The example model (bf16 on a GPU, fp32 on CPU) and a random prompt of ``seq_len`` tokens
    (default ``gpu_len`` on a GPU, 4096 on CPU)."""
    n = seq_len or (gpu_len if device == "cuda" else 4096)
    model = build_model(device, torch.bfloat16 if device == "cuda" else torch.float32)
    return model, torch.randint(0, 1024, (1, n), device=device)


def timed(fn, device: str, repeats: int = 3) -> tuple[torch.Tensor, float]:
    out = fn()  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None, help="prompt length (default 4096 on CPU, 65536 on GPU)")
    p.add_argument("--min-seq-len", type=int, default=0, help="dense below this length (0: always sparse)")
    p.add_argument("--impl", default="auto", choices=("auto", "reference", "triton"),
                   help="the op's implementation (auto: Triton on a GPU, dense SDPA on CPU)")
    p.add_argument("--budget", type=int, nargs=2, metavar=("V", "S"), default=None,
                   help="vertical-slash budget (default: MInference's 1000 6096 on GPU, N/16 N/8 on CPU)")
    args = p.parse_args()
    dev = args.device
    model, ids = model_and_prompt(dev, args.seq_len, gpu_len=65536)
    n, dtype = ids.shape[1], model.dtype

    def dense():
        with torch.no_grad():
            return model(ids, logits_to_keep=1, use_cache=False).logits.float()

    v, s = args.budget or ((1000, 6096) if dev == "cuda" else (n // 16, n // 8))
    pattern = mif_compile.HeadPattern.vertical_slash(v, s)
    sparse_model = torch.compile(model, backend="minference",
                                 options={"min_seq_len": args.min_seq_len, "default_pattern": pattern,
                                          "impl": args.impl})

    def sparse():
        with torch.no_grad():
            return sparse_model(ids, logits_to_keep=1, use_cache=False).logits.float()

    print(f"Llama 4 layers, 8 heads (2 kv), head_dim 64, {dtype}, prompt {n} tokens on {dev}")
    ref, t_dense = timed(dense, dev)
    out, t_sparse = timed(sparse, dev)
    report = mif_compile.last_report()
    print(report)
    err = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"last-token logits: relative error vs dense {err:.3e}, argmax agreement {agree:.0%}")
    print(report.run_summary())
    print(f"prefill: dense eager SDPA {t_dense * 1e3:.1f} ms, minference {t_sparse * 1e3:.1f} ms "
          f"({t_dense / t_sparse:.2f}x)")



if __name__ == "__main__":
    main()

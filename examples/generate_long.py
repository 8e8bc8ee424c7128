"""Long-prompt generation with a compiled model: prefill sparse, decode dense.

    python examples/generate_long.py                    # CPU: 4K-token prompt, small random Llama
    python examples/generate_long.py --seq-len 131072   # GPU

Compiles ``forward`` (``generate`` itself is not compiled by ``torch.compile(model)``), generates a
few tokens for the same prompt with the dense model and with the minference backend, and prints
the time to first token of both, the tokens, and the report of rewritten sites.
"""

from __future__ import annotations

import argparse

import torch

from transformers import LlamaConfig, LlamaForCausalLM

import mif_compile
from quickstart import timed


def model_and_prompt(device: str, seq_len: int | None, gpu_len: int) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """A small random-weight Llama (bf16 on a GPU, fp32 on CPU) and a random prompt of ``seq_len``
    tokens (default ``gpu_len`` on a GPU, 4096 on CPU)."""
    n = seq_len or (gpu_len if device == "cuda" else 4096)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 20)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    return model, torch.randint(0, 1024, (1, n), device=device)


def ttft_and_tokens(model, ids, new_tokens: int, device: str):
    def first_token():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=1, do_sample=False)  # prefill + one step

    _, ttft = timed(first_token, device, repeats=1)  # after a warm-up call (compilation)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return ttft, out[0, ids.shape[1]:].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args()
    dev = args.device
    model, ids = model_and_prompt(dev, args.seq_len, gpu_len=131072)
    n = ids.shape[1]
    t_dense, tok_dense = ttft_and_tokens(model, ids, args.new_tokens, dev)
    # A-shape everywhere: static, so it stays sparse on random weights (estimated patterns would
    # find no structure in random attention and fall back to dense)
    model.forward = torch.compile(model.forward, backend="minference", dynamic=True, options={
        "min_seq_len": 2048, "default_pattern": mif_compile.HeadPattern.a_shape(128, 1024)})
    t_sparse, tok_sparse = ttft_and_tokens(model, ids, args.new_tokens, dev)
    for r in mif_compile.reports():
        print(r.format().splitlines()[0] + ("  <- prefill" if r.rewritten else "  <- decode / short"))
    print(next(r for r in mif_compile.reports() if r.rewritten).format())
    print(f"prompt {n} tokens on {dev}: TTFT dense {t_dense:.3f} s, minference {t_sparse:.3f} s "
          f"({t_dense / t_sparse:.2f}x)")
    print(f"dense tokens:  {tok_dense}\nsparse tokens: {tok_sparse}")


if __name__ == "__main__":
    main()

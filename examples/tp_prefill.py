"""Tensor-parallel prefill: a Llama sharded over ranks, compiled with the minference backend.

    torchrun --nproc-per-node 2 examples/tp_prefill.py              # CPU (gloo), 2K tokens
    torchrun --nproc-per-node 2 examples/tp_prefill.py --seq-len 131072   # 2 GPUs (nccl), bf16

Rank 0 saves a random-weight Llama (8 query heads, 2 kv heads) to ``--model-dir``; every rank
loads it with transformers' ``tp_plan="auto"`` (needs ``accelerate``; without it the example shards
with ``mif_compile.distributed.parallelize_llama``). The plan is written for the whole model (8
heads per layer, each head its own pattern); each rank's attention holds 4 heads, and the backend
gives it its slice of the plan: the report names which global heads. Prints each rank's report, the
error of the logits against the dense TP model and the prefill times. The weights are random, so
attention is diffuse and the small budgets here drop real mass: expect a visible error (a full
budget matches dense; that is what tests/distributed/ checks).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch
import torch.distributed as dist

import mif_compile
from mif_compile import HeadPattern, ModelPlan
from mif_compile.distributed import parallelize_llama


def load(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        from transformers.distributed import DistributedConfig

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                    distributed_config=DistributedConfig(tp_plan="auto")).eval()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("tp",))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    return parallelize_llama(model.eval(), mesh)


def save_model(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 20)
    LlamaForCausalLM(cfg).save_pretrained(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=None, help="prompt length (default 2048 on CPU, 65536 on GPU)")
    p.add_argument("--model-dir", default="/tmp/mif-tp-llama")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank = int(os.environ.get("RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if rank == 0 and not os.path.exists(os.path.join(args.model_dir, "config.json")):
        save_model(args.model_dir)
    dist.barrier()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load(args.model_dir, device, dtype)
    n = args.seq_len or (65536 if device == "cuda" else 2048)
    ids = torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(0)).to(device)

    # one pattern per global head: ranks get different slices
    w = max(64, n // 8)
    layer = (HeadPattern.dense(), HeadPattern.a_shape(64, w), HeadPattern.vertical_slash(100, w // 2),
             HeadPattern.a_shape(128, 2 * w), HeadPattern.vertical_slash(30, w), HeadPattern.block_sparse(max(2, n // 512)),
             HeadPattern.a_shape(64, w), HeadPattern.dense())
    plan = ModelPlan(layers=(layer, layer[::-1]))
    compiled = torch.compile(model, backend="minference", options={"config": plan, "min_seq_len": 0, "max_density": 1.0})

    def run(m):
        with torch.no_grad():
            out = m(ids, logits_to_keep=1, use_cache=False).logits.float()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    ref = run(model)
    t0 = time.perf_counter()
    ref = run(model)
    t_dense = time.perf_counter() - t0
    out = run(compiled)  # compiles
    t0 = time.perf_counter()
    out = run(compiled)
    t_sparse = time.perf_counter() - t0
    err = ((out - ref).norm() / ref.norm()).item()
    for r in range(dist.get_world_size()):
        if r == rank:
            print(f"--- rank {rank}: {mif_compile.last_report()}", flush=True)
            print(f"rank {rank}: prompt {n} tokens, last-token logits relative error vs dense TP {err:.3e}; "
                  f"prefill dense {t_dense * 1e3:.1f} ms, minference {t_sparse * 1e3:.1f} ms", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

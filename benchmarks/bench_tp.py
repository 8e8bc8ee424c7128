"""Tensor-parallel prefill on GPUs: 1 GPU vs 2 GPUs (TP=2), dense vs minference. NOT RUN YET.

    torchrun --nproc-per-node 1 benchmarks/bench_tp.py --lengths 131072 262144
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --lengths 131072 262144
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --check     # bf16: TP=2 equals 1 process

Llama-3-8B architecture (32 query heads, 8 kv heads, d = 128), random bf16 weights built on every
GPU with the same seed and, under TP, sharded with ``mif_compile.distributed.parallelize_llama``
(``parallelize_module`` with the model's colwise/rowwise plan, the layout ``tp_plan="auto"`` gives):
each rank runs 16 query heads and 4 kv heads. One forward with ``logits_to_keep=1``,
``use_cache=False``; dense is eager SDPA with the cuDNN backend, ours
``torch.compile(model, backend="minference", dynamic=True)`` with A-shape (128, 3968) on every head
(``ashape``) or the default vertical-slash (``vs``). Times are the median of ``--repeats`` runs,
synchronised across ranks; compile time is not in them. Rank 0 writes JSON rows to
``--out/bench_tp_{world}gpu.json``.

``--check``: a 2-layer, 8-head Llama with a per-head plan whose heads differ (dense, A-shape,
vertical-slash, small budgets); the TP-compiled logits must match the same model compiled in one
process within the bf16 tolerance (relative norm 1e-2), and a full budget must match dense.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prefill import build  # noqa: E402  (the same random-weight Llama)




def shard(model, world: int):
    if world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh

    from mif_compile.distributed import parallelize_llama

    return parallelize_llama(model, init_device_mesh("cuda", (world,), mesh_dim_names=("tp",)))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return sorted(times)[(len(times) - 1) // 2]


def forward(m, ids):
    with torch.no_grad():
        return m(ids, logits_to_keep=1, use_cache=False).logits.float()


def check(world: int) -> None:
    import mif_compile
    from mif_compile import HeadPattern, ModelPlan
    from mif_compile.testing import rel_err

    layer = (HeadPattern.dense(), HeadPattern.a_shape(64, 256), HeadPattern.vertical_slash(30, 128),
             HeadPattern.a_shape(128, 512), HeadPattern.vertical_slash(100, 256), HeadPattern.dense(),
             HeadPattern.a_shape(64, 128), HeadPattern.block_sparse(4))
    plan = ModelPlan(layers=(layer, layer[::-1]))
    opts = {"config": plan, "min_seq_len": 0, "max_density": 1.0}
    full = {"default_pattern": HeadPattern.vertical_slash(1 << 20, 1 << 20), "min_seq_len": 0, "max_density": 1.0}
    small = dict(layers=2, heads=8, kv_heads=2, hidden=1024, inter=2048, vocab=1024)
    ids = torch.randint(0, 1024, (1, 4096), generator=torch.Generator().manual_seed(1)).cuda()
    one = forward(torch.compile(build(**small), backend="minference", options=opts), ids)
    torch._dynamo.reset()
    tp = shard(build(**small), world)
    out = forward(torch.compile(tp, backend="minference", options=opts), ids)
    report = str(mif_compile.last_report())
    torch._dynamo.reset()
    out_full = forward(torch.compile(tp, backend="minference", options=full), ids)
    dense = forward(tp, ids)
    e_plan, e_full = rel_err(out, one), rel_err(out_full, dense)
    print(f"rank {dist.get_rank()}: TP={world} vs one process, same plan: relative error {e_plan:.2e}; "
          f"full budget vs dense: {e_full:.2e}\n{report}", flush=True)
    assert e_plan <= 1e-2 and e_full <= 1e-2, (e_plan, e_full)


def main() -> None:
    import mif_compile
    from mif_compile import HeadPattern
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--plans", nargs="+", default=["ashape", "vs"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.check:
        check(world)
        dist.destroy_process_group()
        return
    model = shard(build(args.layers), world)
    torch.cuda.empty_cache()
    plans = {"vs": HeadPattern.vertical_slash(1000, 6096), "ashape": HeadPattern.a_shape(128, 3968)}
    rows = []
    gpu = torch.cuda.get_device_name()
    for n in args.lengths:
        ids = torch.randint(0, 128256, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            forward(model, ids)
            t = timed(lambda: forward(model, ids), args.repeats)
        rows.append(dict(kernel="prefill", provider="dense_cudnn", N=n, tp=world, s=t, gpu=gpu))
        for name in args.plans:
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="minference", dynamic=True,
                                     options={"default_pattern": plans[name]})
            t0 = time.perf_counter()
            forward(compiled, ids)
            compile_s = time.perf_counter() - t0
            t = timed(lambda: forward(compiled, ids), args.repeats)
            rows.append(dict(kernel="prefill", provider=f"minference_{name}", N=n, tp=world, s=t, compile_s=compile_s,
                             gpu=gpu, sparse_sites=len(mif_compile.last_report().rewritten)))
        torch.cuda.empty_cache()
        if rank == 0:
            for r in rows[-1 - len(args.plans):]:
                print(f"N={n:7d} TP={world} {r['provider']:18s} {r['s']:.3f} s", flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        versions = dict(torch=torch.__version__, peak_gb=torch.cuda.max_memory_allocated() / 2**30)
        with open(os.path.join(args.out, f"bench_tp_{world}gpu.json"), "w") as f:
            json.dump([{**r, **versions} for r in rows], f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

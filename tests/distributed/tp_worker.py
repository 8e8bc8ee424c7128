"""One rank of the tensor-parallel test, run as ``torchrun --nproc-per-node 2 tp_worker.py CASE.pt``.

``CASE.pt`` (written by ``test_tp.py``) holds the saved model's directory, the plan, the inputs and
the single-process compiled logits for them. Each rank loads the model sharded over a gloo TP mesh
(``how`` "hf": transformers' ``tp_plan="auto"``, which needs ``accelerate``; "dtensor":
``mif_compile.distributed.parallelize_llama``, ``parallelize_module`` with the model's own
colwise/rowwise plan), compiles it with
``backend="minference"`` and the same plan, and checks, by assertion:
- the logits equal the single-process compiled logits (default automatic dynamic: a prompt, then a
  left-padded batch of another length with ``attention_mask``, which recompiles with symbols), and the report names the rank's global heads;
- a full budget equals the dense TP model (first input, Inductor off);
- deliberately taking the other rank's slice of the plan changes the logits (the check can fail).
Rank 0 writes ``CASE.pt.done`` with what it measured.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

import mif_compile
from mif_compile import HeadPattern, ModelPlan
from mif_compile import distributed as mif_dist

ATOL = RTOL = 1e-4  # fp32; TP sums the row-parallel projections in another order


def load_sharded(path: str, how: str):
    from transformers import AutoModelForCausalLM

    if how == "hf":
        try:
            from transformers.distributed import DistributedConfig
            kw = {"distributed_config": DistributedConfig(tp_plan="auto")}
        except ImportError:  # older transformers 5.x
            kw = {"tp_plan": "auto"}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa", **kw)
        return model.eval()
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return mif_dist.parallelize_llama(model, mesh)


def compile_and_run(model, inputs, plan, dynamic=None, **extra):
    options = dict(config=plan, min_seq_len=0, impl="reference", max_density=1.0, block_m=64, **extra)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="minference", options=options, dynamic=dynamic)
    with torch.no_grad():
        return [compiled(ids, attention_mask=mask).logits for ids, mask in inputs]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main() -> None:
    t0 = time.perf_counter()
    seconds = {}
    case = torch.load(sys.argv[1], weights_only=False)
    model = load_sharded(case["model_dir"], case["how"])
    seconds["load"] = time.perf_counter() - t0
    rank, world = dist.get_rank(), dist.get_world_size()
    heads = model.config.num_attention_heads
    local = heads // world

    plan = ModelPlan.from_json(case["plan"])
    mif_compile.clear_reports()
    outs = compile_and_run(model, case["inputs"], plan)
    seconds["compiled"] = time.perf_counter() - t0 - sum(seconds.values())
    diff = max_diff(outs, case["expected"])
    assert diff <= ATOL * 10, f"rank {rank}: TP logits differ from the single-process compiled model by {diff:.3e}"
    for o, e in zip(outs, case["expected"]):
        torch.testing.assert_close(o, e, atol=ATOL, rtol=RTOL)
    reports = [r for r in mif_compile.reports() if r.rewritten]
    assert reports, "no graph was rewritten"
    assert {s.num_heads for r in reports for s in r.sites} == {local}, "the sites should hold the rank's heads only"
    lines = [str(r) for r in reports]
    want = f"tp rank {rank}/{world}: global heads {rank * local}-{rank * local + local - 1} of {heads}, plan sliced"
    for text in lines:
        assert text.count(want) == model.config.num_hidden_layers, f"rank {rank}: report lacks {want!r}:\n{text}"

    # a full budget equals the dense TP model (first input; the rewritten graph run without Inductor)
    first = case["inputs"][:1]
    full = ModelPlan(default=HeadPattern.vertical_slash(4096, 4096))
    outs_full = compile_and_run(model, first, full, inductor=False)
    with torch.no_grad():
        dense = [model(ids, attention_mask=mask).logits for ids, mask in first]
    torch.testing.assert_close(outs_full[0], dense[0], atol=ATOL, rtol=RTOL)
    diff_dense = max_diff(dense, case["expected"])
    seconds["full"] = time.perf_counter() - t0 - sum(seconds.values())

    # negative control: the other rank's slice must give other logits
    right = mif_dist.layer_heads

    def wrong(plan, layer, num_heads, tp):
        other = mif_dist.TPRank((tp.rank + 1) % tp.size, tp.size, tp.source)
        return right(plan, layer, num_heads, other)

    mif_dist.layer_heads = wrong
    try:
        outs_wrong = compile_and_run(model, first, plan, inductor=False)
    finally:
        mif_dist.layer_heads = right
    diff_wrong = max_diff(outs_wrong, case["expected"])
    seconds["wrong"] = time.perf_counter() - t0 - sum(seconds.values())
    assert diff_wrong > 100 * ATOL, f"rank {rank}: the wrong slice changed the logits by only {diff_wrong:.3e}"

    if rank == 0:
        with open(sys.argv[1] + ".done", "w") as f:
            json.dump({"diff": diff, "diff_sparse_vs_dense": diff_dense, "diff_wrong_slice": diff_wrong, "seconds": seconds,
                       "report": lines[-1]}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

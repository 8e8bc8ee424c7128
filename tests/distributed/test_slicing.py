"""Head slicing of plans under tensor parallelism, in one process: ``layer_heads`` directly, and the
backend with the rank faked (the real two-rank run is ``test_tp.py``)."""

from __future__ import annotations

import pytest
import torch

import mif_compile
from mif_compile import BackendConfig, ConfigError, HeadPattern, ModelPlan
from mif_compile import distributed as mif_dist
from mif_compile.distributed import TPRank, layer_heads
from tests.backend.models import tiny_llama, use_reference_attention

MESH = "DTensor mesh dimension 'tp'"
WORLD = "torch.distributed world; no DTensor among the graph's inputs"
EIGHT = tuple(HeadPattern.a_shape(64, 64 * (h + 1)) for h in range(8))  # every head differs


@pytest.mark.parametrize("rank", range(4))
def test_global_plan_gives_each_rank_its_heads(rank):
    heads, held = layer_heads(ModelPlan(layers=(EIGHT,)), 0, 2, TPRank(rank, 4, MESH))
    assert heads == EIGHT[2 * rank:2 * rank + 2]
    assert (held.start, held.stop, held.total, held.plan) == (2 * rank, 2 * rank + 2, 8, "sliced")
    assert held.describe() == f"tp rank {rank}/4: global heads {2 * rank}-{2 * rank + 1} of 8, plan sliced"


def test_local_plan_is_taken_as_the_ranks_own():
    plan = ModelPlan(layers=(EIGHT[:2], EIGHT[2:4]))
    heads, held = layer_heads(plan, 1, 2, TPRank(3, 4, MESH))
    assert heads == EIGHT[2:4]
    assert (held.start, held.total, held.plan) == (6, 8, "per rank")


def test_uniform_plan_names_heads_only_when_the_mesh_says_so():
    plan = ModelPlan.uniform(HeadPattern.a_shape())
    heads, held = layer_heads(plan, 5, 3, TPRank(1, 2, MESH))
    assert heads == (HeadPattern.a_shape(),) * 3 and held.describe().startswith("tp rank 1/2: global heads 3-5 of 6")
    # a process group's world may be data parallel (every rank holds all heads): claim nothing
    assert layer_heads(plan, 5, 3, TPRank(1, 2, WORLD))[1] is None
    # ... but a plan of exactly local * world heads is sliced, and says so
    assert layer_heads(ModelPlan(layers=(EIGHT,)), 0, 4, TPRank(1, 2, WORLD))[0] == EIGHT[4:]


@pytest.mark.parametrize("count", [3, 6, 16])
def test_plan_matching_neither_count_fails(count):
    with pytest.raises(ConfigError) as e:
        layer_heads(ModelPlan(layers=(EIGHT[:2], EIGHT[:count] if count <= 8 else EIGHT * 2)), 1, 2, TPRank(1, 4, MESH))
    msg = str(e.value)
    assert f"layer 1: the plan gives {count} heads" in msg
    assert "tensor-parallel rank 1 of 4" in msg and "2 query heads of 8" in msg
    assert "give 8 heads per layer" in msg and "or 2 (this rank's own)" in msg


def test_without_tp_the_single_process_check_stands():
    with pytest.raises(ConfigError, match="the plan gives 8 heads, but the model's attention has 4 query heads"):
        layer_heads(ModelPlan(layers=(EIGHT,)), 0, 4, None)
    assert mif_dist.tp_rank([torch.zeros(2)]) is None  # no process group in this process


def _prompt(n=320):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(3))


def _backend(plan):
    return mif_compile.backend(plan, inductor=False, min_seq_len=0, max_density=1.0, block_m=64, impl="reference")


def test_backend_slices_a_global_plan_for_the_faked_rank(monkeypatch):
    """A 4-head model stands for rank 1 of 2 of an 8-head one: its sites must run heads 4-7 of the
    plan, exactly as the eager reference with that slice."""
    monkeypatch.setattr(mif_dist, "tp_rank", lambda example_inputs: TPRank(1, 2, MESH))
    plan = ModelPlan(layers=(EIGHT, EIGHT[::-1]))
    model, ids = tiny_llama(), _prompt()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=_backend(plan), dynamic=True)(ids).logits
    report = mif_compile.last_report()
    assert [s.patterns for s in report.rewritten] == [EIGHT[4:], EIGHT[::-1][4:]]
    assert str(report).count("tp rank 1/2: global heads 4-7 of 8, plan sliced") == 2

    def reference(layers):
        cfg = BackendConfig(plan=ModelPlan(layers=layers), min_seq_len=0, max_density=1.0, block_m=64, impl="reference")
        with torch.no_grad():
            return use_reference_attention(tiny_llama(), cfg)(ids).logits

    torch.testing.assert_close(out, reference((EIGHT[4:], EIGHT[::-1][4:])), atol=1e-5, rtol=1e-5)
    assert (out - reference((EIGHT[:4], EIGHT[::-1][:4]))).abs().max() > 1e-3  # rank 0's slice differs


def test_backend_names_both_counts_when_the_plan_fits_neither(monkeypatch):
    monkeypatch.setattr(mif_dist, "tp_rank", lambda example_inputs: TPRank(1, 2, MESH))
    torch._dynamo.reset()
    compiled = torch.compile(tiny_llama(), backend=_backend(ModelPlan(layers=(EIGHT[:6], EIGHT[:6]))))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as e:
        compiled(_prompt(64))
    assert "layer 0: the plan gives 6 heads" in str(e.value) and "4 query heads of 8" in str(e.value)

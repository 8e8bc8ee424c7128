"""The search on a GPU: Triton index builders give the CPU reference's recall, and the kernel-aware
cost (measured time) gives finite costs and choices that follow the rule."""

from __future__ import annotations

import math

import pytest
import torch

from mif_compile.search import SearchSettings, choose, search
from tests.search.planted import EXPECTED, LAYOUT, N, PlantedModel
from tests.search.test_search import CANDS

pytestmark = pytest.mark.cuda


def test_gpu_recall_matches_cpu_and_recovers_patterns(planted):
    model, ids = planted
    st = SearchSettings(candidates=CANDS, cost="pairs")
    cpu = search(model, ids, settings=st, num_layers=2, num_heads=4, progress=False)
    gpu = search(model.cuda(), ids.cuda(), settings=st, num_layers=2, num_heads=4, progress=False)
    for i in range(2):
        torch.testing.assert_close(torch.tensor(gpu.scores[i].recall), torch.tensor(cpu.scores[i].recall), atol=2e-3, rtol=0)
        # TF32 estimation may pick other near-tied junk diagonals: kept counts differ a little
        torch.testing.assert_close(torch.tensor(gpu.scores[i].cost), torch.tensor(cpu.scores[i].cost), atol=0.05, rtol=0)
    assert [[hp.pattern.value for hp in layer] for layer in gpu.plan.layers] == [[EXPECTED[k] for k in layer] for layer in LAYOUT]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_aware_cost(planted, dtype):
    model, ids = planted
    st = SearchSettings(candidates=CANDS)  # cost auto -> time on CUDA
    res = search(model.cuda().to(dtype), ids.cuda(), settings=st, num_layers=2, num_heads=4, progress=False)
    for i, sc in res.scores.items():
        assert sc.cost_kind == "time"
        for h in range(4):
            assert all(math.isfinite(c) and c > 0 for c in sc.cost[h])
            chosen = res.plan.layers[i][h]
            assert chosen.score >= 0.95, f"layer {i} head {h}: {chosen}"
            j = choose(sc.recall[h], sc.cost[h], st)
            assert (sc.candidates[j].pattern, sc.candidates[j].budget) == (chosen.pattern, chosen.budget)
        print(f"layer {i}: " + ", ".join(hp.describe() for hp in res.plan.layers[i]))

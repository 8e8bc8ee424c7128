"""Tensor-parallel prefill on CPU: ``torchrun --nproc-per-node 2`` with gloo (see ``tp_worker.py``).

A tiny random Llama (4 query heads, 2 kv heads, 2 layers) is saved locally and loaded sharded on two
ranks; compiled with ``backend="minference"`` and a plan whose heads differ (dense, A-shape and
vertical-slash with budgets that drop keys), each rank's logits must equal the single-process
compiled model's with the same plan.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mif_compile import HeadPattern, ModelPlan
from tests.backend.models import tiny_llama

WORKER = Path(__file__).with_name("tp_worker.py")
ROOT = Path(__file__).parents[2]

# Rank 0 holds global heads 0-1, rank 1 heads 2-3: every rank's slice mixes patterns, and the two
# slices differ, so the other rank's slice changes the output (the worker checks that too).
PLAN = ModelPlan(layers=(
    (HeadPattern.dense(), HeadPattern.a_shape(64, 64), HeadPattern.vertical_slash(30, 60), HeadPattern.a_shape(64, 128)),
    (HeadPattern.a_shape(64, 64), HeadPattern.vertical_slash(30, 50), HeadPattern.dense(), HeadPattern.a_shape(64, 64)),
))
OPTIONS = dict(min_seq_len=0, impl="reference", max_density=1.0, block_m=64)


def _inputs():
    """A prompt of 300 tokens, then a left-padded batch of 2 x 333."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 333, dtype=torch.long)
    mask[1, :37] = 0
    return [(torch.randint(0, 96, (1, 300), generator=g), None), (torch.randint(0, 96, (2, 333), generator=g), mask)]


def _single_process(model, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="minference", options=dict(config=PLAN, **OPTIONS))
    with torch.no_grad():
        return [compiled(ids, attention_mask=mask).logits for ids, mask in inputs]


HOW = ["dtensor", pytest.param("hf", marks=pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="transformers' tp_plan='auto' needs accelerate"))]


@pytest.mark.parametrize("how", HOW)
def test_tp2_equals_single_process(tmp_path, how):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    inputs = _inputs()
    t0 = time.perf_counter()
    expected = _single_process(model, inputs)
    print(f"single process: {time.perf_counter() - t0:.1f} s")  # shown with pytest -s
    case = dict(model_dir=str(tmp_path / "model"), how=how, plan=PLAN.to_json(), inputs=inputs,
                expected=expected)
    torch.save(case, tmp_path / "case.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(WORKER), str(tmp_path / "case.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    done = json.loads((tmp_path / "case.pt.done").read_text())
    print({k: v for k, v in done.items() if k != "report"})  # shown with pytest -s
    assert done["diff"] <= 1e-3
    assert done["diff_wrong_slice"] > 1e-2
    assert "global heads 0-1 of 4, plan sliced" in done["report"]

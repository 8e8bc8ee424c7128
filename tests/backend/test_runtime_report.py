"""What the op ran at run time, per rewritten site: sparse, or dense SDPA and why (below min_seq_len,
estimated density above max_density, CPU with impl="auto"), in ``last_report()`` and in one INFO log
line per site and reason. On CPU ``impl="auto"`` runs dense SDPA (the reference is slower than dense)."""

from __future__ import annotations

import logging

import pytest
import torch

import mif_compile
from mif_compile import HeadPattern, ops
from mif_compile import report as R
from tests.backend.models import tiny_llama

N = 320
SPARSE = HeadPattern.a_shape(64, 64)  # drops keys at N=320: its output differs from dense


def _ids(n=N):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(3))


def _compiled(model, **options):
    opts = dict(min_seq_len=0, max_density=1.0, default_pattern=SPARSE, inductor=False)
    opts.update(options)
    return torch.compile(model, backend="minference", options=opts)


def test_cpu_auto_runs_dense_and_reports_it(caplog, monkeypatch):
    model = tiny_llama()
    ids = _ids()
    monkeypatch.setattr(ops, "_CPU_NOTED", False)

    def no_index(*a, **k):
        raise AssertionError("impl='auto' on CPU must not build a sparse index")

    monkeypatch.setattr(ops, "build_layer_index", no_index)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="mif_compile"):
        dense = model(ids).logits
        comp = _compiled(model)
        out = comp(ids).logits
        comp(ids)
    rep = mif_compile.last_report()
    assert len(rep.rewritten) == 2  # compiled as sparse sites ...
    assert [(r.layer, r.calls, r.sparse, dict(r.dense)) for r in rep.runs] == [
        (0, 2, 0, {R.CPU_AUTO: 2}), (1, 2, 0, {R.CPU_AUTO: 2})]  # ... that ran dense, and say so
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    text = rep.format()
    assert "2 of 2 rewritten site(s) ran dense SDPA" in text and "impl='reference'" in text
    assert "layer 0: 2 call(s), 0 sparse, 2 dense (CPU with impl='auto')" in text
    msgs = [r.getMessage() for r in caplog.records if r.name == "mif_compile"]
    assert sum("CPU tensors with impl='auto'" in m for m in msgs) == 1  # the one-time note
    assert sum("ran dense SDPA at N=320" in m for m in msgs) == 2  # first dense call of each layer, not every call


def test_reference_on_cpu_runs_sparse():
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        out = _compiled(model, impl="reference")(ids).logits
    rep = mif_compile.last_report()
    assert [(r.calls, r.sparse, dict(r.dense)) for r in rep.runs] == [(1, 1, {}), (1, 1, {})]
    assert rep.runs[0].last_density is None  # max_density=1.0: the op read no density (no device read)
    assert (out - dense).abs().max() > 1e-3  # the sparse budget did run
    assert "all 2 rewritten site(s) ran sparse" in rep.format()


def test_short_prompt_and_density_fallback_are_recorded(caplog):
    model = tiny_llama()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="mif_compile"):
        comp = _compiled(model, impl="reference", min_seq_len=300, max_density=0.05)
        comp(_ids(200))  # below min_seq_len
        comp(_ids(N))  # above: the estimated index keeps more than 5% of the pairs
    # automatic dynamic: the second length may compile a second graph; the sites of both count
    runs = [r for rep in mif_compile.reports() for r in rep.runs if r.calls]
    reasons = {k for r in runs for k in r.dense}
    assert reasons == {R.SHORT, R.DENSITY}, [r.format() for r in runs]
    assert all(r.sparse == 0 for r in runs)
    last = [r for r in runs if r.last_seq_len == N]
    assert last and all("kept density" in r.last_reason and "> max_density 0.05" in r.last_reason for r in last)
    assert all(r.last_density > 0.05 for r in last)
    text = "\n".join(rep.format() for rep in mif_compile.reports())
    assert "N=200 < min_seq_len 300" in "\n".join(m.getMessage() for m in caplog.records)
    assert "density above max_density" in text


def test_op_called_outside_the_backend_records_nothing():
    q = torch.randn(1, 2, 130, 16)
    before = len(R._SITES)
    out = ops.run_layer(q, q[:, :1], q[:, :1], None, 0.25, [SPARSE.pattern.code] * 2, [64, 64], [64, 64], 0)
    assert len(R._SITES) == before and out.shape == q.shape

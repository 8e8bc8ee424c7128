"""Decode-scored answers (``score="decode"``, the ``ours_kvB`` runs of ``--kv-budget``): a cached prefill
through the first queried key, then one decode step per token. On the shipped model (CPU): dense scored
that way predicts what dense teacher-forced predicts; a cache budget covering the prompt is dense; a small
budget compresses the cache, and its predictions are those of generate() through the same backend."""

import json

import pytest
import torch

import mif_compile
from mif_compile import BackendConfig, ConfigError
from mif_compile.evaluate import Run, _predict_decode, _predict_teacher, _Runner, default_runs, load_model, main
from mif_compile.tasks import default_text, multikey_sample, needle_sample

FORCED = dict(min_seq_len=0, max_density=1.0, impl="reference")


@pytest.fixture(scope="module")
def builtin():
    torch.manual_seed(0)
    model, fmt, tok = load_model("builtin", "cpu", torch.float32)
    hay = tok.encode(default_text(200_000))
    samples = [needle_sample(fmt, hay, 512, d, 10 + d) for d in (0.0, 0.5)] + \
        [multikey_sample(fmt, hay, 640, 6, s) for s in (1, 2)]
    return model, samples


def _preds(model, run, samples, kept=None):
    runner = _Runner(model, run, inductor=False)
    return [p for s in samples for p in (_predict_decode(runner, [s], "cpu", kept) if run.score == "decode"
                                         else _predict_teacher(runner, [s], "cpu"))], runner


def test_dense_by_decode_predicts_what_teacher_forcing_predicts(builtin):
    model, samples = builtin
    teacher, _ = _preds(model, Run("dense"), samples)
    kept = []
    decode, _ = _preds(model, Run("dense", score="decode"), samples, kept)
    assert decode == teacher
    assert sum(map(len, decode)) > len(samples)  # multi-token answers, several queries per multi-key sample
    # the prefill ends at the first queried key: the rest of the sequence went through decode steps
    assert all(p == k < len(s.ids) for (p, k), s in zip(kept, samples))
    # a batch whose first queries start at different positions is split by that position
    runner = _Runner(model, Run("dense", score="decode"), inductor=False)
    assert _predict_decode(runner, samples[2:], "cpu") == teacher[2:]


def test_budget_covering_the_prompt_equals_dense(builtin):
    model, samples = builtin
    dense, _ = _preds(model, Run("dense", score="decode"), samples)
    kept = []
    cfg = BackendConfig(kv_budget=1024, **FORCED)
    ours, runner = _preds(model, Run("ours_kv1024", cfg, score="decode"), samples, kept)
    assert ours == dense
    assert all(p == k for p, k in kept)  # nothing to drop
    assert "cache compressed to min(N, 1024) keys" in runner.report


def test_small_budget_compresses_and_decodes_as_generate_does(builtin):
    model, samples = builtin
    sample = samples[2]  # multi-key: several queries, so decode steps through the compressed cache
    cfg = BackendConfig(kv_budget=96, **FORCED)
    kept = []
    ours, runner = _preds(model, Run("ours_kv96", cfg, score="decode"), [sample], kept)
    (p0, k), = kept
    assert k == 96 < p0 and "cache kept 96 of" in runner.report
    # generate() tracks positions itself: through the same backend from the same prompt, made to emit
    # the true tail, the argmax of its raw logits is the decode-scored prediction at every answer
    pos = [start - 1 + i for start, toks in sample.answers for i in range(len(toks))]
    torch._dynamo.reset()
    fwd = model.forward
    try:
        model.forward = torch.compile(model.forward, backend=mif_compile.backend(cfg, inductor=False))
        with torch.no_grad():
            gen = model.generate(torch.tensor([sample.ids[:p0]]), max_new_tokens=max(pos) - p0 + 2, do_sample=False,
                                 prefix_allowed_tokens_fn=lambda b, seq: [sample.ids[len(seq)]],
                                 output_logits=True, return_dict_in_generate=True)
    finally:
        model.forward = fwd
        torch._dynamo.reset()
    assert gen.sequences[0].tolist() == sample.ids[:max(pos) + 2]
    assert [int(gen.logits[p - p0 + 1][0].argmax()) for p in pos] == ours[0]
    dense, _ = _preds(model, Run("dense"), [sample])
    assert ours != dense  # the budget changed some answer: a test that can tell the two apart


def test_kv_runs_are_decode_scored():
    runs = default_runs(kv_budgets=[128, 4096], a_shape=None, block_sparse=None)
    assert [(r.name, r.score, r.cfg and r.cfg.kv_budget) for r in runs] == [
        ("dense", "teacher", None), ("ours", "teacher", None), ("ours_kv128", "decode", 128),
        ("ours_kv4096", "decode", 4096)]
    assert all(r.score == "decode" for r in default_runs(score="decode"))
    with pytest.raises(ConfigError, match="kv_budget=128 compresses the cache, which only decoding reads"):
        Run("x", BackendConfig(kv_budget=128))


def test_cli_kv_budget(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["--model", "builtin", "--lengths", "512", "--depths", "2", "--samples", "1", "--keys", "4",
               "--ppl-samples", "1", "--baselines", "", "--fixed", "off", "--op-settings", "forced",
               "--kv-budget", "1024,96", "--score", "decode", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "decode-scored (prefill through the first queried key, then decode steps): dense, ours, ours_kv1024, " \
           "ours_kv96" in printed
    assert "ours_kv96:   run     layer 0: 1 call(s), 1 sparse" in printed and "cache kept 96 of" in printed
    res = json.loads((out / "results.json").read_text())
    rows = {r["run"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "ours", "ours_kv1024", "ours_kv96"]
    assert all(r["score"] == "decode" for r in rows.values())
    assert rows["ours_kv1024"]["kv_budget"] == 1024 and rows["ours_kv96"]["kv_budget"] == 96
    assert "kv_budget" not in rows["dense"] and "kv_budget" not in rows["ours"]
    assert not rows["ours_kv1024"]["cache_compressed"] and rows["ours_kv96"]["cache_compressed"]
    assert rows["ours_kv96"]["cache_keys"] == 96 < rows["ours_kv96"]["prefill_tokens"]
    for key in ("needle", "multikey"):
        assert rows["ours_kv1024"][key] == rows["dense"][key]
    # perplexity from the cached prefill's logits: compression leaves them as they are
    assert rows["ours_kv96"]["ppl"] == pytest.approx(rows["ours_kv1024"]["ppl"], rel=1e-6)
    assert rows["ours"]["ppl"] == pytest.approx(rows["dense"]["ppl"], rel=1e-4)
    assert res["runs"]["ours_kv96"]["sparse_settings"]["kv_budget"] == 96
    assert "kv_budget=96, cache 96 of" in (out / "table.md").read_text()
    assert "Decode-scored rows" in (out / "table.md").read_text()

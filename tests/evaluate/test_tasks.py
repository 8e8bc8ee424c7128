"""The evaluation probes: exact lengths, answers where they say, the training layout matches the harness."""

import importlib.util
import os

import pytest
import torch

from mif_compile.tasks import (KEY_BASE, NEEDLE, QUERY, VALUE_BASE, ByteTokenizer, HFTokenizer, SymbolFormat,
                               TextFormat, default_text, multikey_sample, needle_sample, text_window)

HAY = ByteTokenizer().encode(default_text(200_000))


def test_default_text_is_ascii_source_without_symbols():
    assert len(HAY) == 200_000
    assert max(HAY) < 128 and NEEDLE not in HAY and QUERY not in HAY
    assert b"def " in bytes(HAY)


@pytest.mark.parametrize("length,depth", [(64, 0.0), (333, 0.5), (1000, 1.0)])
def test_needle_sample_layout(length, depth):
    fmt = SymbolFormat()
    s = needle_sample(fmt, HAY, length, depth, seed=3)
    assert len(s.ids) == length
    (start, ans), = s.answers
    assert start == length - 1 and s.ids[start] == ans[0] >= VALUE_BASE
    key = s.ids[start - 1]
    assert s.ids[start - 2] == QUERY and KEY_BASE <= key < VALUE_BASE
    pos = s.ids.index(NEEDLE)
    assert s.ids[pos + 1:pos + 3] == [key, ans[0]]
    n_hay = length - 3 - 3
    assert abs(pos - round(depth * n_hay)) <= 0
    assert needle_sample(fmt, HAY, length, depth, seed=3).ids == s.ids  # same inputs for every run


def test_multikey_every_key_queried_once():
    fmt = SymbolFormat()
    s = multikey_sample(fmt, HAY, 777, 16, seed=1)
    assert len(s.ids) == 777 and len(s.answers) == 16
    bound = {s.ids[i + 1]: s.ids[i + 2] for i, t in enumerate(s.ids[:-48]) if t == NEEDLE}
    assert len(bound) == 16
    for start, (value,) in s.answers:
        assert s.ids[start - 2] == QUERY and bound[s.ids[start - 1]] == value == s.ids[start]


def test_too_short_raises():
    with pytest.raises(ValueError, match="too short"):
        multikey_sample(SymbolFormat(), HAY, 40, 16, seed=0)


class _FakeHF:
    bos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1 + b for b in text.encode("ascii")]


def test_text_format_answers_follow_questions():
    tok = HFTokenizer(_FakeHF())
    fmt = TextFormat(tok)
    hay = tok.encode(default_text(50_000))
    s = multikey_sample(fmt, hay, 2000, 3, seed=0)
    assert len(s.ids) == 2000 and s.ids[0] == 0
    text = bytes(i - 1 for i in s.ids[1:]).decode("ascii")
    for start, ans in s.answers:
        value = bytes(i - 1 for i in ans).decode().strip()
        assert s.ids[start:start + len(ans)] == ans
        assert f"is: {value}." in text  # the needle holds the same value
    assert len(text_window(fmt, hay, 500, seed=0)) == 500


def _train_module():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "train", "train_retrieval.py")
    spec = importlib.util.spec_from_file_location("train_retrieval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_batches_use_the_harness_layout():
    T = _train_module()
    text = T.text_tensor("cpu", 100_000)
    x, lm, ans = T.make_batch(text, 3, 256, 8, torch.Generator().manual_seed(0))
    assert x.shape == (3, 256) and ans.sum() == 3 * 8
    for row, a, m in zip(x.tolist(), ans, lm):
        bound = {row[i + 1]: row[i + 2] for i, t in enumerate(row[:-24]) if t == NEEDLE}
        assert len(bound) == 8
        for i in a.nonzero().flatten().tolist():  # position i predicts row[i + 1]
            assert row[i - 1] == QUERY and bound[row[i]] == row[i + 1]
        assert all(row[i + 1] < 128 for i in m.nonzero().flatten().tolist())

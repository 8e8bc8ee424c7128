"""examples/quickstart.py on CPU: the shipped model, a prompt with hidden keys, the sparse path really
runs (density below the op's max_density) and retrieves the same value as dense; with impl='auto'
it says that the op ran dense on CPU. (The GPU path is benchmarks/gpu_eval_long.sh.)"""

import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def quickstart(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    compile_ = torch.compile

    def compile_eager(model, backend=None, options=None, **kw):  # Inductor's CPU build is slow; not what is tested
        return compile_(model, backend=backend, options={**(options or {}), "inductor": False}, **kw)

    monkeypatch.setattr(torch, "compile", compile_eager)
    return quickstart


def test_prompt_asks_for_a_hidden_key(quickstart):
    from mif_compile.evaluate import load_model

    _, fmt, tok = load_model("builtin", "cpu", torch.float32)
    ids, key, value = quickstart.prompt(fmt, tok, 700, seed=3)
    row = ids[0].tolist()
    assert len(row) == 700 and row[-2:] == [2, key]  # QUERY key: the value is the next token
    assert [1, key, value] in [row[i:i + 3] for i in range(len(row) - 2)]  # its needle is in the prompt


def test_cpu_run_is_sparse_and_answers_like_dense(quickstart, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--seq-len", "1024"])
    quickstart.main()
    out = capsys.readouterr().out
    assert "the shipped retrieval Llama (2 layers, 8 heads" in out
    assert "at run time: all 2 rewritten site(s) ran sparse" in out, out
    dens = [float(d) for d in re.findall(r"kept density (\d\.\d+)", out)]
    assert dens and max(dens) < 0.6, out  # really sparse, below the op's max_density
    m = re.search(r"answer: dense (\d+), minference (\d+) \(the same; expected (\d+)\)", out)
    assert m and m.group(1) == m.group(2) == m.group(3), out
    assert "Speed is the GPU's job" in out and "speedup" not in out


def test_cpu_auto_says_it_ran_dense(quickstart, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--seq-len", "256", "--impl", "auto"])
    quickstart.main()
    out = capsys.readouterr().out
    assert "at run time: 2 of 2 rewritten site(s) ran dense SDPA" in out and "CPU with impl='auto'" in out

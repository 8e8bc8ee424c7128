"""Entry-point discovery and a lean import, each checked in a fresh interpreter.

- ``torch.compile(model, backend="minference")`` works without importing mif_compile first (the
  ``torch_dynamo_backends`` entry point).
- ``import mif_compile`` registers the custom op and nothing else: no top-level ``passes`` /
  ``kernels``, none of mif_compile's kernel modules, no Triton, no CUDA initialisation.

The subprocesses run from an empty directory, so the repository root is not on ``sys.path``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_fresh(code: str, cwd, timeout: float = 120) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


MODEL = """
import torch, torch.nn.functional as F

class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Attn(), Attn()])
    def forward(self, q, k, v):
        for layer in self.layers:
            q = layer(q, k, v)
        return q

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
"""


def test_backend_found_by_name_with_inductor(tmp_path):
    """The documented one-liner: no import of mif_compile, default options (Inductor on CPU)."""
    out = run_fresh(
        MODEL
        + """
import sys
assert "mif_compile" not in sys.modules
out = torch.compile(Model(), backend="minference")(q, k, v)
torch.testing.assert_close(out, Model()(q, k, v))
assert "mif_compile" in sys.modules  # loaded through the entry point
import mif_compile
r = mif_compile.last_report()
assert r.counters["rewritten"] == 2 and [s.layer for s in r.sites] == [0, 1], r
print("ok", r.min_seq_len)
""",
        tmp_path,
    )
    assert out.split() == ["ok", "32768"]


def test_backend_found_by_name_with_options(tmp_path):
    out = run_fresh(
        MODEL
        + """
import sys
assert "mif_compile" not in sys.modules
opts = {"inductor": False, "min_seq_len": 10**9, "config": {"layers": [[{"pattern": "dense"}] * 2, ["a_shape", "a_shape"]]}}
out = torch.compile(Model(), backend="minference", options=opts)(q, k, v)
torch.testing.assert_close(out, Model()(q, k, v))
import mif_compile
r = mif_compile.last_report()
assert [s.rewritten for s in r.sites] == [False, True], r
assert r.min_seq_len == 10**9
# the dense branch of the op needs no kernel module
assert not [m for m in sys.modules if m.startswith("mif_compile.kernels")]
assert "passes" not in sys.modules and "kernels" not in sys.modules
print("ok")
""",
        tmp_path,
    )
    assert out.strip() == "ok"


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="torch_dynamo_backends")}
    assert "minference" in eps
    assert eps["minference"].value == "mif_compile.backend:minference"


def test_lean_import(tmp_path):
    out = run_fresh(
        """
import sys
import torch

def _no_cuda(*a, **k):
    raise AssertionError("import mif_compile initialised CUDA")

torch.cuda._lazy_init = _no_cuda
before = set(sys.modules)
import mif_compile
new = set(sys.modules) - before

assert not torch.cuda.is_initialized()
assert "passes" not in sys.modules and "kernels" not in sys.modules
assert not [m for m in new if m.split(".")[0] in ("passes", "kernels")], sorted(new)
kernels = [m for m in sys.modules if m.startswith("mif_compile.kernels")]
assert not kernels, kernels  # mif_compile.kernels(.attention, .estimate, .index, ...) not loaded
tri = [m for m in new if m == "triton" or m.startswith("triton.")]
assert not tri, tri
assert hasattr(torch.ops.mif, "sparse_attention")  # the op is registered at import

# the top-level names are not importable either (kernels is also a PyPI package: it must not be ours)
import importlib.util
assert importlib.util.find_spec("passes") is None
spec = importlib.util.find_spec("kernels")  # the Hugging Face package (transformers >= 5.25 needs it), or none
ours = importlib.util.find_spec("mif_compile.kernels").origin
assert spec is None or spec.origin != ours, (spec, ours)
assert importlib.util.find_spec("mif_compile.passes") is not None
print("ok")
""",
        tmp_path,
    )
    assert out.strip() == "ok"


@pytest.mark.parametrize("name", ["minference"])
def test_backend_lookup_in_process(name):
    import torch._dynamo

    from mif_compile.backend import minference

    assert torch._dynamo.lookup_backend(name) is minference

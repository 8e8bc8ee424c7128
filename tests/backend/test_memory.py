"""Peak memory of the op at 32K tokens on CPU, measured in a child process (``ru_maxrss`` growth).

Before issue 10 the padded dense path built an N x N ``tril`` and a (B, 1, N, N) mask (+6.3 GB at 32K
on a tiny model) and the reference sparse path took +2.3 GB for 2 heads. Each case runs in a fresh
interpreter: inputs are made and everything is warmed up at a short length first, then the peak RSS
growth of one call at N = 32768 is compared with eager SDPA's (``is_causal=True``) in the same child.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

N = 32768
LIMIT_MB = 256  # about 20 MB for eager flash SDPA; the old paths took 2.3-6.3 GB

_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    import mif_compile
    from mif_compile import HeadPattern
    from mif_compile.ops import encode_heads

    torch.set_num_threads(2)
    case, n = sys.argv[1], int(sys.argv[2])
    codes, b0, b1 = encode_heads([HeadPattern.vertical_slash(30, 50)] * 2)

    def call(q, k, v, pad):
        if case == "eager":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        min_len = 1 << 30 if case == "dense_padded" else 0
        return torch.ops.mif.sparse_attention(q, k, v, pad, 0.25, codes, b0, b1, min_len, 64, 128, "reference", 1.0)

    def inputs(n):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
        pad = torch.ones(1, n, dtype=torch.bool)
        pad[:, : n // 8] = False  # left padding
        return q, k, v, pad

    with torch.no_grad():
        call(*inputs(1024))  # warm-up: kernels, allocator, lazy imports
        x = inputs(n)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = call(*x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.shape == (1, 2, n, 16) and bool(torch.isfinite(out[:, :, n // 8:]).all())
    print(json.dumps({"growth_mb": (after - before) / 1024}))
""")


def _growth_mb(case: str, n: int = N) -> float:
    res = subprocess.run([sys.executable, "-c", _CHILD, case, str(n)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["growth_mb"]


@pytest.mark.parametrize("case", ["dense_padded", "sparse"])
def test_peak_memory_at_32k_is_bounded(case):
    grown = _growth_mb(case)
    eager = _growth_mb("eager")
    assert grown < LIMIT_MB, f"{case}: +{grown:.0f} MB at N={N} (eager flash SDPA: +{eager:.0f} MB)"

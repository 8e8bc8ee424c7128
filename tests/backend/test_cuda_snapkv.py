"""GPU: KV-cache compression through the Triton estimation (its column sums are the votes) and
Inductor, against the float64 SnapKV oracle; generate() with a covering budget equals dense."""

import pytest
import torch
from transformers import DynamicCache

import mif_compile
from mif_compile.config import HeadPattern
from mif_compile.kvcache import run_layer_snapkv
from mif_compile.ops import encode_heads
from tests.kernels._oracle import snapkv_reference

pytestmark = pytest.mark.cuda


def _pooled64(q, k, window, pool):
    """The oracle's pooled votes [B, Hkv, N - window] in float64 (to judge near-ties)."""
    B, H, N, _ = q.shape
    Hkv = k.shape[1]
    s = torch.einsum("bhrd,bhnd->bhrn", q[:, :, N - window:].double(),
                     k.double().repeat_interleave(H // Hkv, 1)) * q.shape[-1] ** -0.5
    rows = torch.arange(N - window, N, device=q.device)
    s = s.masked_fill(torch.arange(N, device=q.device)[None, :] > rows[:, None], float("-inf"))
    votes = s.softmax(-1).sum(2).view(B, Hkv, H // Hkv, N).sum(2)[..., : N - window]
    return torch.nn.functional.max_pool1d(votes.reshape(B * Hkv, 1, -1), pool, 1, pool // 2).view(B, Hkv, -1)


@pytest.mark.parametrize("head", [HeadPattern.vertical_slash(1000, 2048), HeadPattern("dense")])
def test_triton_votes_choose_the_reference_keys(head):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 8192, 128, device="cuda", dtype=torch.float16, generator=g) for h in (4, 2, 2))
    codes, b0, b1 = encode_heads([head] * 4)
    _, kc, _ = run_layer_snapkv(q, k, v, None, 128 ** -0.5, codes, b0, b1, 0, 64, 128, "auto", 1.0, None, -1,
                                1024, 64, 7)
    ref = snapkv_reference(q.cpu(), k.cpu(), keep=1024, window=64, pool=7, scale=128 ** -0.5).cuda()
    eq = (kc[:, :, :, None, :] == k[:, :, None, :, :]).all(-1)  # [B, Hkv, K, N]
    pos = eq.float().argmax(-1)
    pooled = _pooled64(q, k, 64, 7)
    for j in range(2):  # any difference is a near-tie of the pooled votes at the top-k boundary
        got, want = set(pos[0, j].tolist()), set(ref[0, j].tolist())
        edge = pooled[0, j][sorted(want - set(range(8128, 8192)))].min()
        for i in got ^ want:
            assert abs(float(pooled[0, j, i] - edge)) <= 1e-4 * float(edge), (j, i)
        assert len(got ^ want) <= 4


def test_generate_with_budgets_on_the_gpu():
    """A left-padded batch: a covering budget gives dense tokens; a small one leaves budget + pads + decoded keys."""
    from tests.backend.models import tiny_llama

    def model_on_gpu():
        return tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2).cuda().half()

    ids = torch.randint(0, 96, (2, 3000), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :300] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = model_on_gpu().generate(ids, **kw)
        full = model_on_gpu()
        full.forward = torch.compile(full.forward, dynamic=True, backend=mif_compile.backend(
            min_seq_len=0, max_density=1.0, default_pattern=HeadPattern.vertical_slash(4096, 4096), kv_budget=4096))
        assert torch.equal(full.generate(ids, **kw), ref)
        small = model_on_gpu()
        small.forward = torch.compile(small.forward, dynamic=True, backend=mif_compile.backend(
            min_seq_len=0, max_density=1.0, kv_budget=512))
        cache = DynamicCache(config=small.config)
        small.generate(ids, past_key_values=cache, **kw)
    assert [layer.keys.shape[2] for layer in cache.layers] == [512 + 300 + 3] * 2

"""A misspelt backend-level option (``prefill_cudagraph``, ``inductr``, ``Mode``) is refused with a list of
known options that includes the backend's own settings (``mode``, ``inductor``, ``prefill_cudagraphs``;
``model`` for ``mif_compile.backend()``), so the message shows the name the user meant (found by session
9's user-pattern hunt: the list held only BackendConfig's fields)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mif_compile
from mif_compile import ConfigError


def _fn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("typo,meant", [("prefill_cudagraph", "prefill_cudagraphs"), ("inductr", "inductor"),
                                        ("Mode", "mode")])
def test_unknown_option_lists_the_backend_settings(typo, meant):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ConfigError) as e:
        torch.compile(_fn, backend="minference", options={typo: True})(q, q, q)
    msg = str(e.value)
    assert f"unknown option(s) ['{typo}']" in msg and f"'{meant}'" in msg and "'min_seq_len'" in msg, msg


def test_unknown_setting_of_the_factory_lists_its_arguments():
    with pytest.raises(ConfigError) as e:
        mif_compile.backend(prefill_cudagraph=True)
    msg = str(e.value)
    assert "['prefill_cudagraph']" in msg and "'prefill_cudagraphs'" in msg and "'model'" in msg, msg
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['min_seqlen'\]"):
        mif_compile.backend(mif_compile.BackendConfig(), min_seqlen=10)

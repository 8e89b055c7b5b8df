"""The bridge's KV cache under both names of transformers' cache argument (pin-free install)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import load_backend
from packaging.version import Version

from icp_lens.kv_compat import _copy_cache, bridge_kv_cache, cache_argument, cache_kwargs
from icp_lens.model import hf_model


class _Old(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=False):  # transformers < 5.24
        return input_ids


class _New(torch.nn.Module):
    def forward(self, input_ids, cache=None, use_cache=False):  # transformers >= 5.24
        return input_ids


def test_cache_argument_reads_either_signature() -> None:
    assert cache_argument(_Old()) == "past_key_values"
    assert cache_argument(_New()) == "cache"


def test_copy_cache_maps_cache_to_past_key_values_only_when_missing() -> None:
    c, other = object(), object()
    assert _copy_cache(None, (1,), {"cache": c})[1] == {"cache": c, "past_key_values": c}
    assert _copy_cache(None, (), {"cache": c, "past_key_values": other})[1]["past_key_values"] is other
    assert _copy_cache(None, (), {"past_key_values": other})[1] == {"past_key_values": other}
    assert _copy_cache(None, (), {})[1] == {}


@pytest.mark.hooks
def test_installed_transformers_reuses_a_prefix_cache_exactly(micro_dirs) -> None:
    """Prefix run + suffix on its cache == one full run, on the installed transformers.

    Leg 1 installs the newest transformers (``cache``), leg 2's TransformerLens 3.x an older one
    (``past_key_values``): between them, both code paths run.
    """
    for arch in ("gpt2", "llama"):
        model = load_backend("bridge", micro_dirs[arch])
        name = cache_argument(hf_model(model))
        renamed = Version(transformers.__version__).release >= (5, 24)
        assert name == ("cache" if renamed else "past_key_values"), (transformers.__version__, name)
        tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1]])
        with torch.no_grad(), bridge_kv_cache(model):
            full = model(tokens)
            _, cache = model(tokens[:, :4], return_type="logits_and_cache")
            suffix = model(tokens[:, 4:], **cache_kwargs(model, cache))
        torch.testing.assert_close(suffix, full[:, 4:], rtol=0, atol=1e-5)
        handles = [m for m in model.modules() if getattr(m, "_forward_pre_hooks", None)]
        assert not any(_copy_cache in h._forward_pre_hooks.values() for h in handles), "hooks left behind"

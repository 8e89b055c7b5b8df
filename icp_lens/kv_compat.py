"""One KV-cache argument name for the bridge, whatever transformers calls it.

transformers 5.24 renamed the decoder's cache argument from ``past_key_values`` to
``cache``: a Llama decoder layer now calls ``self.self_attn(..., cache=cache)``. The
attention components of TransformerLens 4.3's ``TransformerBridge`` read the cache from
``past_key_values`` only, so under transformers >= 5.24 a KV cache handed to the bridge is
silently dropped: the suffix attends to itself alone and the logits are wrong.

:func:`bridge_kv_cache` bridges the two names for the duration of a forward pass: inside
it, every attention component of the bridge that receives ``cache=`` also sees it as
``past_key_values=``. Under older transformers (the argument is still ``past_key_values``)
and for ``HookedTransformer`` (its own ``past_kv_cache``) it does nothing. icp_lens wraps
each forward pass it runs on a cached prefix in it, so the KV-reuse shortcuts of the exact
scorer and the trainer stay exact on both sides of the rename; the pin
``transformers<5.24`` is no longer needed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch

__all__ = ["bridge_kv_cache", "cache_argument", "cache_kwargs"]


@lru_cache(maxsize=None)
def _cache_argument_of(forward: Any) -> str:
    params = inspect.signature(forward).parameters
    if "past_key_values" in params:
        return "past_key_values"
    if "cache" in params:
        return "cache"
    return "past_key_values"


def cache_argument(hf: torch.nn.Module) -> str:
    """The name under which ``hf``'s forward takes a KV cache: ``past_key_values`` or ``cache``."""
    return _cache_argument_of(type(hf).forward)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a bridge's forward, under the name its HF model takes.

    (transformers >= 5.24 still accepts ``past_key_values`` but warns that it goes in 5.40.)
    """
    from icp_lens.model import hf_model

    return {cache_argument(hf_model(model)): cache}


def _copy_cache(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
    return args, kwargs


def _attention_components(model: Any) -> list[torch.nn.Module]:
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:  # TransformerLens without the bridge's attention component
        return []
    return [m for m in model.modules() if isinstance(m, AttentionBridge)]


@contextmanager
def bridge_kv_cache(model: Any) -> Iterator[None]:
    """Within the block, the bridge's attention reads a cache passed as ``cache=`` too.

    A no-op for a ``HookedTransformer`` and under transformers < 5.24. The hooks are
    forward pre-hooks on the bridge's attention components; they are removed on exit,
    also when the forward pass raises.
    """
    from icp_lens.hooks import module_hooks
    from icp_lens.model import hf_model, is_bridge

    if not is_bridge(model) or cache_argument(hf_model(model)) != "cache":
        yield
        return
    with module_hooks(pre_kwargs=[(m, _copy_cache) for m in _attention_components(model)]):
        yield

"""The hooked-model layer: one view of TransformerBridge (TL >= 3) and HookedTransformer (TL <= 3).

icp_lens never subclasses or patches a TransformerLens model. It works through the
standard hook names (``blocks.L.mlp.hook_post``, ``blocks.L.attn.hook_z``,
``blocks.L.hook_resid_pre``, ``blocks.L.attn.hook_v`` ...), which resolve on both model
classes, and through ``model.cfg`` for the sizes. This module holds the few helpers that
need to know which class they face:

* ``model_dims`` — layer/head/neuron counts as a frozen dataclass;
* ``hook_names`` / ``resolve_hook_point`` — the valid hook names, and a lookup that fails
  with the closest names and the valid layer range instead of a ``KeyError``;
* ``boot_bridge`` — a ``TransformerBridge`` from a local HF directory or a hub name;
* ``hf_model`` — the Hugging Face model underneath a bridge (what pruning edits);
* ``to_tokens`` — tokenization with BOS handled the way the model expects.

Loading a ``HookedTransformer`` from a local HF checkpoint (TransformerLens 3.x only) lives
in ``icp_lens.legacy``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from icp_lens.devices import input_device

__all__ = [
    "HookedModel",
    "ModelDims",
    "UnknownHookError",
    "model_dims",
    "hook_names",
    "resolve_hook_point",
    "is_bridge",
    "boot_bridge",
    "hf_model",
    "to_tokens",
]

#: Either a ``transformer_lens.model_bridge.TransformerBridge`` or a
#: ``transformer_lens.HookedTransformer``; typed loosely so that neither import is required.
HookedModel = Any


class UnknownHookError(KeyError):
    """A hook name, layer or index that the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelDims:
    """Sizes that decide which features exist."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int


def _check_supported(model: HookedModel) -> None:
    # look for ``hook_dict`` on the class (the bridge's property) or in the instance's
    # ``__dict__`` (HookedTransformer's attribute): ``hasattr`` would build the bridge's
    # whole hook dictionary, ~0.5 ms on SmolLM2, once per call
    has_hooks = hasattr(type(model), "hook_dict") or "hook_dict" in getattr(model, "__dict__", {})
    if not has_hooks or not hasattr(model, "cfg"):
        raise TypeError(
            f"Expected a TransformerLens TransformerBridge or HookedTransformer, got "
            f"{type(model).__name__}. Boot one with icp_lens.boot_bridge(path_or_name)."
        )


def is_bridge(model: HookedModel) -> bool:
    """True for a ``TransformerBridge`` (which wraps a live Hugging Face model)."""
    return hasattr(model, "original_model")


def model_dims(model: HookedModel) -> ModelDims:
    """Layer, head and neuron counts read from ``model.cfg``."""
    _check_supported(model)
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    d_mlp = getattr(cfg, "d_mlp", None)
    if d_mlp is None:
        raise ValueError("model.cfg.d_mlp is not set: this model has no standard MLP layer")
    return ModelDims(
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_head=int(cfg.d_head),
        d_mlp=int(d_mlp),
        d_vocab=int(cfg.d_vocab),
    )


def hook_names(model: HookedModel) -> list[str]:
    """Every hook name the model accepts (aliases included), sorted."""
    _check_supported(model)
    return sorted(model.hook_dict)


_LAYER = re.compile(r"^blocks\.(\d+)\.(.*)$")


def resolve_hook_point(model: HookedModel, name: str) -> Any:
    """The ``HookPoint`` called ``name``; an unknown name raises with the closest valid ones."""
    _check_supported(model)
    hooks = model.hook_dict
    if name in hooks:
        return hooks[name]
    message = f"Unknown hook name {name!r}."
    match = _LAYER.match(name)
    n_layers = int(model.cfg.n_layers)
    if match and int(match[1]) >= n_layers:
        message += f" Layer {match[1]} is out of range: valid layers are 0..{n_layers - 1}."
        name_in_range = f"blocks.0.{match[2]}"
        if name_in_range in hooks:
            message += f" (blocks.L.{match[2]} exists for L in 0..{n_layers - 1}.)"
    close = difflib.get_close_matches(name, list(hooks), n=5, cutoff=0.6)
    if close:
        message += f" Closest hook names: {close}."
    else:
        message += f" Valid names look like {sorted(hooks)[:5]} ... ({len(hooks)} in all)."
    raise UnknownHookError(message)


def boot_bridge(
    name_or_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> Any:
    """Boot a ``TransformerBridge`` from a local HF directory or a hub name, in eval mode.

    A local directory must hold an HF checkpoint (``config.json``, weights) and its
    tokenizer. Extra keyword arguments go to ``TransformerBridge.boot_transformers``.
    """
    from transformer_lens.model_bridge import TransformerBridge

    source = str(name_or_dir)
    path = Path(source).expanduser()
    from icp_lens.loading import looks_like_path, require_safetensors, require_tokenizer

    if path.exists():
        source = str(require_safetensors(path))
        if "tokenizer" not in kwargs:
            require_tokenizer(path)
    elif looks_like_path(name_or_dir):
        raise FileNotFoundError(f"No such model directory: {path}")
    bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype, **kwargs)
    bridge.eval()
    return bridge


def hf_model(model: HookedModel) -> torch.nn.Module:
    """The Hugging Face model a ``TransformerBridge`` wraps (its live weights).

    A ``HookedTransformer`` keeps converted copies of the weights, not the HF model:
    load the HF checkpoint it came from with ``transformers`` instead.
    """
    if is_bridge(model):
        return model.original_model
    if hasattr(model, "hook_dict"):
        raise TypeError(
            "A HookedTransformer holds converted weights, not a Hugging Face model. Load "
            "the HF checkpoint it came from with AutoModelForCausalLM.from_pretrained(dir)."
        )
    raise TypeError(f"Expected a TransformerBridge, got {type(model).__name__}")


def to_tokens(
    model: HookedModel,
    text: str | Sequence[str],
    *,
    prepend_bos: bool | None = None,
) -> Int[Tensor, "batch pos"]:
    """Tokenize like the model does (BOS prepended when the model expects it).

    All strings must tokenize to the same length: icp_lens aligns counterfactuals
    position by position, so ragged batches are refused rather than silently padded.
    """
    _check_supported(model)
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise ValueError("to_tokens needs at least one string")
    rows = [model.to_tokens(t, prepend_bos=prepend_bos)[0] for t in texts]
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        by_len = {len(r): t for r, t in zip(rows, texts, strict=True)}
        raise ValueError(
            f"Strings tokenize to different lengths {sorted(lengths)}, e.g. "
            + "; ".join(f"{n} tokens: {t!r}" for n, t in sorted(by_len.items())[:3])
        )
    return torch.stack(rows).to(input_device(model))

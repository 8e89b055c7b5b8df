"""A clean Hugging Face model to edit, from a checkpoint directory, an HF model or a bridge.

The pruner never edits the model the user is holding: it works on a fresh copy whose
state dict is exactly the HF one, so ``save_pretrained`` writes an ordinary checkpoint.

- A directory is loaded with ``transformers`` (the class named in ``config.json``'s
  ``architectures``, else ``AutoModelForCausalLM``).
- An HF model is deep-copied.
- A ``TransformerBridge`` wraps its HF model's submodules in place (its state dict has
  keys like ``transformer.h.0._original_component.mlp...``, and its split q/k/v views
  make ``save_pretrained`` fail), so a new model of the same class is built from the
  config and given the wrapped weights under their original names. A bridge in
  *compatibility mode* is refused: its weights were folded and centred in place
  (``center_unembed`` alone changes the output distribution's logits), which is not
  reversible, so its HF model is no longer the checkpoint the plan was made for.
- A ``HookedTransformer`` holds converted weights only: pass the HF checkpoint it was
  loaded from. A plan made on it applies there unchanged, because plans name hook-point
  features, not TransformerLens weight matrices.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["clean_hf_model", "load_tokenizer", "load_checkpoint", "load_for_command"]

_WRAPPED = "._original_component"


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32, **placement: Any) -> nn.Module:
    """Load an HF checkpoint directory with ``transformers`` alone, in eval mode.

    ``placement`` goes to ``from_pretrained`` (``device_map=...``, ``offload_folder=...``:
    a model split over devices by accelerate).
    """
    import transformers

    from icp_lens.loading import require_safetensors

    path = require_safetensors(path)
    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, **placement)
    return model.eval()


def load_for_command(path: str | Path, args: Any) -> nn.Module:
    """``load_checkpoint`` placed and typed as a command's ``--device`` / ``--device-map`` / ``--dtype`` ask."""
    from icp_lens.devices import load_kwargs, resolve_dtype

    placement = load_kwargs(args)
    device = placement.pop("device")
    model = load_checkpoint(path, dtype=resolve_dtype(getattr(args, "dtype", "float32")), **placement)
    return model.to(device) if device is not None else model


def load_tokenizer(source: Any) -> Any:
    """The tokenizer that goes with ``source`` (a directory, a bridge), or ``None``."""
    if isinstance(source, (str, Path)):
        from transformers import AutoTokenizer

        from icp_lens.loading import require_tokenizer

        return AutoTokenizer.from_pretrained(require_tokenizer(source))
    return getattr(source, "tokenizer", None)


def _is_bridge(model: Any) -> bool:
    return hasattr(model, "original_model") and hasattr(model, "hook_dict")


def _from_bridge(bridge: Any) -> nn.Module:
    if getattr(bridge, "compatibility_mode", False):
        raise ValueError(
            "This TransformerBridge is in compatibility mode: its HF weights were folded and "
            "centred in place, which cannot be undone exactly, so they are not the checkpoint's "
            "weights any more. Build the plan on it if you like, then apply it to the HF checkpoint "
            "directory (apply_plan(dir, plan, out)), or boot a bridge without compatibility mode."
        )
    wrapped = bridge.original_model
    fresh = type(wrapped)(copy.deepcopy(wrapped.config))
    wanted = fresh.state_dict()
    state = {}
    for key, value in wrapped.state_dict().items():
        clean = key.replace(_WRAPPED, "")
        if clean in wanted:
            state[clean] = value.detach().clone()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise RuntimeError(f"Could not recover these HF weights from the bridge: {missing[:5]}")
    fresh.load_state_dict(state)
    return fresh.to(next(wrapped.parameters()).dtype).eval()


def clean_hf_model(source: Any, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh, unhooked HF model with ``source``'s weights (never ``source`` itself)."""
    if isinstance(source, (str, Path)):
        return load_checkpoint(source, dtype=dtype)
    if _is_bridge(source):
        return _from_bridge(source)
    if hasattr(source, "hook_dict"):
        raise TypeError(
            "A HookedTransformer holds converted weights, not a Hugging Face model: pass the HF "
            "checkpoint directory it was loaded from (the plan applies to it unchanged)."
        )
    if isinstance(source, nn.Module) and hasattr(source, "config"):
        return copy.deepcopy(source).eval()
    raise TypeError(
        f"Expected an HF checkpoint directory, an HF model or a TransformerBridge, got {type(source).__name__}"
    )

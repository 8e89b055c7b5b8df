"""Writing an HF checkpoint atomically: all of it, or nothing.

``export_checkpoint`` writes the model (safetensors + config), the tokenizer and the
plan into a temporary directory next to the target, then moves it into place with one
``rename``. A non-empty target is refused unless ``overwrite=True``; with it, the old
directory is moved aside first and deleted only once the new one is in place. Any
error, or a ``KeyboardInterrupt``, removes the temporary directory, so no
half-written checkpoint is ever left where a user (or ``from_pretrained``) would
find it.

``save_dtype`` (``--save-dtype bfloat16`` on ``prune`` and ``train``) writes the weights in
a smaller floating type *after* the float32 checkpoint has been verified: what was
verified is the edit; the cast only rounds the weights (bf16 keeps 8 bits of mantissa,
so logits move by about 1% of their scale). ``config.json`` then names that dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icp_lens.atomic import atomic_directory, fault_point
from icp_lens.pruning.plan import PLAN_FILE, PrunePlan

__all__ = ["export_checkpoint", "check_target"]


def check_target(out: str | Path, *, overwrite: bool = False, source: Any = None) -> Path:
    """Refuse a non-empty ``out`` unless ``overwrite``, and ``out`` = the ``source`` model directory; return ``out``."""
    out = Path(out)
    if isinstance(source, (str, Path)) and Path(source).expanduser().exists():
        if Path(source).expanduser().resolve() == out.expanduser().resolve():
            raise ValueError(f"--out {out} is the source model itself; write the result to another directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
    return out


def export_checkpoint(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer: Any = None,
    plan: PrunePlan | None = None,
    overwrite: bool = False,
    finish: Callable[[Path], Any] | None = None,
    save_dtype: torch.dtype | None = None,
) -> Path:
    """Save ``model`` (+ tokenizer, + ``plan.json``) to ``out`` atomically; return ``out``.

    ``finish(tmp)`` runs on the complete temporary directory before the one rename: the
    place to write more files (``training.json``, a verification report) and to verify the
    checkpoint, so that ``out`` appears with all of them or not at all. ``save_dtype``
    rewrites the weights' floating tensors in that dtype after ``finish`` (see the module
    docstring).
    """
    out = check_target(out, overwrite=overwrite).resolve()
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        fault_point("export:after-weights")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / PLAN_FILE)
        if finish is not None:
            finish(tmp)
        if save_dtype is not None and save_dtype != torch.float32:
            _resave(model, tmp, save_dtype)
        fault_point("export:after-finish")
    return out


def _resave(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """The weights of ``folder`` again, floating tensors cast to ``dtype``; ``config.json`` names it."""
    if not dtype.is_floating_point:
        raise ValueError(f"save_dtype must be a floating type, got {dtype}")
    cast: dict[int, torch.Tensor] = {}  # by storage, so tied weights stay one tensor
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            ptr = value.data_ptr()
            if ptr not in cast:
                cast[ptr] = value.detach().to(dtype)
            value = cast[ptr]
        state[key] = value
    model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

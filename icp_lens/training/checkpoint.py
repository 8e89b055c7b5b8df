"""Training checkpoints: everything needed to resume, in safetensors and JSON (nothing pickled).

A checkpoint directory holds::

    state.json            step, config, history, early-stopping state, optimizer hyper-
                          parameters, scheduler state, objective state (GroupDRO weights),
                          JTT error set, ...
    trainable.safetensors the trainable parameters (all weights, or the LoRA adapters)
    optimizer.safetensors the optimizer's per-parameter tensors (AdamW moments, steps)
    best.safetensors      the best parameters so far (early stopping), if any
    means.safetensors     the fitted means of the ``mean`` intervention, if any

It is replaced atomically (written next to the target, then renamed into place), so an
interruption while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from icp_lens.atomic import atomic_directory, fault_point

__all__ = [
    "STATE_FILE",
    "save_checkpoint",
    "load_checkpoint_state",
    "has_checkpoint",
    "flatten_optimizer",
    "unflatten_optimizer",
]

STATE_FILE = "state.json"
_FORMAT = "icp_lens.train_state"


def _tensors(d: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous, storage-independent copies (safetensors refuses tensors that share memory)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in d.items()}


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as flat tensors (``"<param>.<key>"``) plus JSON-ready metadata."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def has_checkpoint(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / STATE_FILE).is_file()


def save_checkpoint(
    directory: str | Path,
    state: dict[str, Any],
    trainable: dict[str, Tensor],
    optimizer: dict[str, Any],
    *,
    best: dict[str, Tensor] | None = None,
    means: dict[str, Tensor] | None = None,
) -> Path:
    """Write a checkpoint (replacing the previous one atomically); returns the directory."""
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    payload = {"format": _FORMAT, "version": 1, **state, "optimizer": opt_meta}
    with atomic_directory(directory) as tmp:
        save_file(_tensors(trainable), str(tmp / "trainable.safetensors"))
        save_file(_tensors(opt_tensors), str(tmp / "optimizer.safetensors"))
        if best is not None:
            save_file(_tensors(best), str(tmp / "best.safetensors"))
        if means:
            save_file(_tensors(means), str(tmp / "means.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))
    fault_point("train-checkpoint:after-save")
    return directory


def load_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """Read a checkpoint: ``state`` (JSON), ``trainable``, ``optimizer`` (a state dict), ``best``, ``means``."""
    directory = Path(directory)
    state = json.loads((directory / STATE_FILE).read_text())
    if state.get("format") != _FORMAT:
        raise ValueError(f"{directory} is not an icp_lens training checkpoint")
    optimizer = unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), state.pop("optimizer"))
    best = directory / "best.safetensors"
    means = directory / "means.safetensors"
    return {
        "state": state,
        "trainable": load_file(str(directory / "trainable.safetensors")),
        "optimizer": optimizer,
        "best": load_file(str(best)) if best.is_file() else None,
        "means": load_file(str(means)) if means.is_file() else None,
    }

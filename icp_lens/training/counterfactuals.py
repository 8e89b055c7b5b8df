"""What a ``resample`` intervention patches in during training, and where it can start.

:func:`capture_prefix` computes the flagged features' activations on the spurious
counterfactuals, without gradient, running the model only as far as the last flagged
hook point. :func:`shared_prefix` is the number of leading positions where a batch and
its counterfactuals agree in every row: a causal model's activations there are the same
on both, so a ``resample`` changes nothing before it (the suffix path of
:mod:`icp_lens.training.forward` starts there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from icp_lens.features import Feature
from icp_lens.hooks import HookFn, hooked
from icp_lens.model import HookedModel

__all__ = ["capture_prefix", "shared_prefix"]


class _StopForward(Exception):
    """Raised by a hook once every needed activation is recorded (ends the forward pass early)."""


@torch.no_grad()
def capture_prefix(model: HookedModel, features: Sequence[Feature], tokens: Tensor) -> dict[str, Tensor]:
    """The activations at ``features``' hook points on ``tokens``, running the model only
    as far as the last of those hook points (no gradient)."""
    names = sorted({f.hook_name for f in features})
    store: dict[str, Tensor] = {}

    def record(name: str) -> HookFn:
        def hook_fn(activation: Tensor, hook: Any) -> None:
            store[name] = activation.clone()
            if len(store) == len(names):  # everything needed is recorded: end the forward pass here
                raise _StopForward

        return hook_fn

    with hooked(model, [(name, record(name)) for name in names]):
        try:
            model(tokens)
        except _StopForward:
            pass
    return store


def shared_prefix(tokens: Tensor, other: Tensor) -> int:
    """How many leading positions ``tokens`` and ``other`` (same shape) agree on in every row.

    A model is causal, so up to there any activation on ``other`` equals the one on
    ``tokens``: a ``resample`` from ``other`` changes nothing before it.
    """
    if tokens.shape != other.shape:
        raise ValueError(f"shared_prefix needs equal shapes, got {tuple(tokens.shape)} and {tuple(other.shape)}")
    differs = (tokens != other).any(0).nonzero()
    return int(differs[0]) if differs.numel() else int(tokens.shape[1])

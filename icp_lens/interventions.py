"""Interventions: what replaces a feature's activation during a forward pass.

Causal attribution asks how the output changes under ``do(f = I(f))``: the forward pass
runs as usual except that feature ``f`` (a ``Feature``) takes the value an intervention
``I`` gives it. icp_lens has six:

``Zero()``            ablation: ``f = 0``.
``Mean(value)``       mean ablation: ``f`` = its mean over a reference set of inputs
                      (``fit_means`` computes it, per position or pooled over positions).
``Scale(alpha)``      ``f = alpha * f``; ``Scale(1.0)`` is the identity.
``Resample(source)``  activation patching: ``f`` = its activation on a contrasting input
                      (e.g. the prompt with the spurious attribute swapped), aligned
                      position by position (``resample_from`` records it).
``Swap(other)``       ``f`` = the activation of another feature of the same shape, in the
                      same forward pass, before any edit at that hook point.
``Constant(value)``   ``f = c``.

Each intervention computes a feature's new value from an ``EditContext`` (the feature's
current value at the edited rows and positions, and a reader for other features). Binding
an intervention to a feature, positions and batch rows, and running the model with it, is
``icp_lens.edits``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from jaxtyping import Int
from torch import Tensor

from icp_lens.features import Feature, validate_features
from icp_lens.hooks import capturing
from icp_lens.model import HookedModel, to_tokens

__all__ = [
    "EditContext",
    "Zero",
    "Scale",
    "Constant",
    "Mean",
    "Resample",
    "Swap",
    "Intervention",
    "fit_means",
    "means_over",
    "resample_from",
]


@dataclass(frozen=True)
class EditContext:
    """What an intervention sees when it computes a feature's new value.

    ``current`` is the feature's value at the edited rows and positions (after any earlier
    edit of the same feature in this pass), shape ``[rows, positions, *unit]`` where
    ``unit`` is ``()`` for neurons/residual dims and ``(d_head,)`` for heads.
    ``read(other)`` gives another feature's clean value at the same rows and positions.
    """

    current: Tensor
    rows: slice
    positions: Tensor | slice
    seq_len: int
    batch_size: int
    read: Callable[[Feature], Tensor]


@dataclass(frozen=True)
class Zero:
    """Ablation: the feature is set to zero."""

    def replacement(self, ctx: EditContext) -> Tensor:
        return torch.zeros_like(ctx.current)

    def __str__(self) -> str:
        return "zero"


@dataclass(frozen=True)
class Scale:
    """The feature is multiplied by ``alpha`` (``alpha=0`` is ablation, 1 the identity)."""

    alpha: float

    def replacement(self, ctx: EditContext) -> Tensor:
        return ctx.current * self.alpha

    def __str__(self) -> str:
        return f"scale({self.alpha:g})"


@dataclass(frozen=True, eq=False)
class Constant:
    """The feature is set to a constant: a scalar, or a ``[d_head]`` vector for a head."""

    value: float | Tensor

    def replacement(self, ctx: EditContext) -> Tensor:
        value = torch.as_tensor(self.value, dtype=ctx.current.dtype, device=ctx.current.device)
        return _broadcast(value, ctx.current, "Constant value")

    def __str__(self) -> str:
        value = self.value
        return f"constant({value:g})" if isinstance(value, (int, float)) else "constant"


@dataclass(frozen=True, eq=False)
class Mean:
    """Mean ablation: the feature is set to its mean over a reference set.

    ``value`` has shape ``unit`` (pooled over positions) or ``[pos, *unit]`` when
    ``per_position`` (then inputs must have the reference set's length).
    Build it with ``fit_means``.
    """

    value: Tensor
    per_position: bool = False

    def replacement(self, ctx: EditContext) -> Tensor:
        value = self.value.to(ctx.current.device, ctx.current.dtype)
        if self.per_position:
            if value.shape[0] != ctx.seq_len:
                raise ValueError(
                    f"Per-position mean was fitted on sequences of length {value.shape[0]}, "
                    f"but the input has length {ctx.seq_len}; refit or use per_position=False"
                )
            value = value[ctx.positions]
        return _broadcast(value, ctx.current, "Mean value")

    def __str__(self) -> str:
        return "mean"


@dataclass(frozen=True, eq=False)
class Resample:
    """Activation patching: the feature takes its value on a contrasting input.

    ``source`` is the feature's activation on the contrasting batch, ``[batch, pos, *unit]``,
    row-aligned with the edited rows (or batch 1 to broadcast). Positions align exactly
    when lengths match; with ``align="right"`` a shorter or longer source is aligned on
    the final position (position -1 with -1, -2 with -2, ...). Build it with
    ``resample_from``.
    """

    source: Tensor
    align: Literal["exact", "right"] = "exact"

    def replacement(self, ctx: EditContext) -> Tensor:
        src = self.source.to(ctx.current.device, ctx.current.dtype)
        n_rows = ctx.current.shape[0]
        if src.shape[0] == ctx.batch_size and n_rows != ctx.batch_size:
            src = src[ctx.rows]
        elif src.shape[0] == 1:
            src = src.expand(n_rows, *src.shape[1:])
        elif src.shape[0] != n_rows:
            raise ValueError(
                f"Resample source has batch {src.shape[0]}; expected {n_rows} (the edited rows), "
                f"{ctx.batch_size} (the whole batch) or 1"
            )
        src_len = src.shape[1]
        if src_len == ctx.seq_len:
            return src[:, ctx.positions]
        if self.align != "right":
            raise ValueError(
                f"Resample source has {src_len} positions, the input {ctx.seq_len}; pass inputs "
                "of equal token length or Resample(..., align='right') to align final positions"
            )
        positions = torch.arange(ctx.seq_len, device=src.device)[ctx.positions]
        mapped = positions - ctx.seq_len + src_len
        if (mapped < 0).any():
            raise ValueError(
                f"Right-aligned resampling: positions {positions[mapped < 0].tolist()} of the "
                f"input have no counterpart in a source of length {src_len}; restrict positions"
            )
        return src[:, mapped]

    def __str__(self) -> str:
        return "resample"


@dataclass(frozen=True)
class Swap:
    """The feature takes the (clean) activation of ``other`` in the same forward pass."""

    other: Feature

    def replacement(self, ctx: EditContext) -> Tensor:
        value = ctx.read(self.other)
        if value.shape != ctx.current.shape:
            raise ValueError(
                f"Cannot swap in {self.other}: its activation has shape {tuple(value.shape[2:])} "
                f"per position, the edited feature {tuple(ctx.current.shape[2:])}"
            )
        return value

    def __str__(self) -> str:
        return f"swap({self.other})"


Intervention = Union[Zero, Scale, Constant, Mean, Resample, Swap]


def _broadcast(value: Tensor, like: Tensor, what: str) -> Tensor:
    try:
        return value.expand_as(like)
    except RuntimeError:
        raise ValueError(
            f"{what} of shape {tuple(value.shape)} does not fit the feature's activation "
            f"{tuple(like.shape)} ([rows, positions, *unit])"
        ) from None


def _as_tokens(model: HookedModel, inputs: Tensor | str | Sequence[str]) -> Tensor:
    return inputs if isinstance(inputs, Tensor) else to_tokens(model, inputs)


@torch.no_grad()
def means_over(
    model: HookedModel,
    features: Sequence[Feature],
    batches: Iterable[Int[Tensor, "batch pos"]],
    *,
    per_position: bool = False,
) -> dict[Feature, Mean]:
    """``Mean`` interventions averaged over token batches, keeping only running sums.

    Pooled over examples and positions, or per position (then all batches must have the
    same length). ``fit_means`` and ``icp_lens.scoring.probe_means`` are built on it.
    """
    validate_features(model, features)
    names = sorted({f.hook_name for f in features})
    sums: dict[str, Tensor] = {}
    count = 0
    with capturing(model, names) as store:
        for tokens in batches:
            model(tokens)
            for name in names:
                act = store[name].double()
                total = act.sum(0) if per_position else act.sum((0, 1))
                sums[name] = sums[name] + total if name in sums else total
            count += tokens.shape[0] if per_position else tokens.numel()
    if count == 0:
        raise ValueError("Cannot fit means on an empty reference set")
    return {
        f: Mean((sums[f.hook_name] / count).float().select(1 if per_position else 0, f.index), per_position)
        for f in features
    }


def fit_means(
    model: HookedModel,
    features: Sequence[Feature],
    reference: Int[Tensor, "batch pos"] | Sequence[str],
    *,
    per_position: bool = False,
    batch_size: int = 64,
) -> dict[Feature, Mean]:
    """``Mean`` interventions for ``features``, averaged over a reference set of inputs.

    Streams the reference set in batches and keeps only running sums. With
    ``per_position`` the mean is taken per position (equal-length inputs).
    """
    tokens = _as_tokens(model, reference)
    chunks = (tokens[start : start + batch_size] for start in range(0, tokens.shape[0], batch_size))
    return means_over(model, features, chunks, per_position=per_position)


@torch.no_grad()
def resample_from(
    model: HookedModel,
    features: Sequence[Feature],
    source: Int[Tensor, "batch pos"] | Sequence[str],
    *,
    align: Literal["exact", "right"] = "exact",
) -> dict[Feature, Resample]:
    """``Resample`` interventions: each feature's activation on the ``source`` inputs."""
    tokens = _as_tokens(model, source)
    validate_features(model, features)
    with capturing(model, sorted({f.hook_name for f in features})) as store:
        model(tokens)
    return {f: Resample(f.select(store[f.hook_name]).clone(), align) for f in features}

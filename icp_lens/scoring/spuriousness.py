"""From effects to spuriousness, selectivity and confidence intervals.

Spuriousness of a feature ``f`` is its expected weighted effect size under the
interventions that move the *spurious* attribute,

    S(f) = E_{x ~ probes, I}[ w(x, I) * |dP(x, f, I)| ],

estimated by the mean over probe examples (examples where an intervention is undefined,
``NaN``, are left out) and over interventions. The weight ``w`` can favour harmful changes:

``"uniform"``  w = 1;
``"flips"``    w = 2 where the change flips a correct answer (clean ``P > 0``, patched
               ``P <= 0``; meaningful for ``logit_diff``), 1 elsewhere;
a function     ``w(clean [n], patched [n]) -> [n]`` of your own.

The features most implicated in a spurious signal are often also used by the real task
(why the "neuron skyline" of Marks et al. 2024 underperforms). When the probes carry
*causal* counterfactuals, ``selectivity`` separates the two:

    selectivity(f) = S(f) / (S(f) + C(f)),   C(f) = E_x |dP(x, f, resample_causal)|,

1 for a feature only the spurious attribute moves, 0.5 for one the true cause uses as
much, near 0 for one only the true cause uses.

Confidence intervals are a percentile bootstrap over probe examples (``n_boot``
resamples, seeded), computed for all features at once with resample counts, so 46k
features cost one matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from icp_lens.scoring.effects import Effects

__all__ = ["Weight", "weighted_abs", "spuriousness", "selectivity", "bootstrap_ci"]

Weight = Literal["uniform", "flips"] | Callable[[Tensor, Tensor], Tensor]


def weighted_abs(effects: Effects, weight: Weight = "uniform") -> Float[Tensor, "n_features n_examples"]:
    """``w(x, I) * |dP(x, f, I)|`` for every feature and example (NaN kept)."""
    values = effects.values.float()
    if weight == "uniform":
        return values.abs()
    if not effects.signed:
        raise ValueError(
            f"weight={weight!r} reads the sign of dP, but these are {effects.estimator!r} magnitudes (a ranking "
            "score); use weight='uniform', or score with an estimator of the signed effect (exact, atp, atp+qk, ig)"
        )
    clean = effects.clean.float().unsqueeze(0).expand_as(values)
    patched = clean + values
    if weight == "flips":
        w = 1.0 + ((clean > 0) & (patched <= 0)).float()
    elif callable(weight):
        w = weight(clean, patched)
    else:
        raise ValueError(f"Unknown weight {weight!r}; valid: 'uniform', 'flips' or a function (clean, patched)")
    return w * values.abs()


def _stack(per_intervention: Sequence[Tensor]) -> Tensor:
    """Concatenate [F, N] blocks along examples: the expectation runs over (x, I) pairs."""
    if not per_intervention:
        raise ValueError("No spurious effects to score: pass at least one intervention other than resample_causal")
    return torch.cat(list(per_intervention), dim=1)


def spuriousness(
    effects: Sequence[Effects], *, weight: Weight = "uniform"
) -> tuple[Float[Tensor, " n_features"], Float[Tensor, "n_features n_pairs"]]:
    """``S(f)`` over all given interventions, and the weighted values it averages."""
    values = _stack([weighted_abs(e, weight) for e in effects])
    return values.nanmean(dim=1), values


def selectivity(spurious: Float[Tensor, " n"], causal: Float[Tensor, " n"], eps: float = 1e-9) -> Float[Tensor, " n"]:
    """``S / (S + C)`` (NaN where both are zero)."""
    total = spurious + causal
    out = spurious / total.clamp_min(eps)
    return torch.where(total > eps, out, torch.full_like(out, float("nan")))


_BOOT_ROWS = 2048  # feature rows per bootstrap chunk


def bootstrap_ci(
    values: Float[Tensor, "n_features n_pairs"],
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[Float[Tensor, " n_features"], Float[Tensor, " n_features"]]:
    """Percentile bootstrap interval of the NaN-mean of each row, resampling columns.

    The resamples are drawn on the CPU (a seeded CPU generator: the same draws on every
    device), then the counts move to ``values``' device; the bounds are on that device.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = values.shape[1]
    if n_boot < 1 or n == 0:
        nan = torch.full((values.shape[0],), float("nan"), device=values.device)
        return nan, nan
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (n_boot, n), generator=generator, device="cpu")
    counts = (
        torch.zeros(n_boot, n, dtype=torch.float64, device="cpu")
        .scatter_add_(1, picks, torch.ones(n_boot, n, dtype=torch.float64, device="cpu"))
        .to(values.device)
    )
    alpha = (1 - level) / 2
    lows, highs = [], []
    # rows in chunks: the [rows, n_boot] resample means stay small however many features
    # are scored (46k features x 200 resamples would hold ~0.3 GB at once)
    for start in range(0, values.shape[0], _BOOT_ROWS):
        chunk = values[start : start + _BOOT_ROWS]
        valid = ~torch.isnan(chunk)
        sums = torch.where(valid, chunk, torch.zeros_like(chunk)).double() @ counts.T
        totals = valid.double() @ counts.T
        means = (sums / totals).float()  # [rows, B]; NaN where a resample drew no valid example
        lows.append(torch.nanquantile(means, alpha, dim=1))
        highs.append(torch.nanquantile(means, 1 - alpha, dim=1))
    if not lows:
        empty = torch.zeros(0, device=values.device)
        return empty, empty
    return torch.cat(lows), torch.cat(highs)

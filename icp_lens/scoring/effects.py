"""Effects: ``dP(x, f, I)`` for every feature and probe example, the raw material of a score.

Every scorer (exact patching, attribution, hybrid) produces an ``Effects`` object: for one
intervention ``I`` and a list of features ``f``, the change of the output property
``P`` on every probe example ``x``,

    dP(x, f, I) = P(M(x | do(f = I(f)))) - P(M(x)),

as a ``[n_features, n_examples]`` tensor in probe-set order, plus ``P(M(x))`` itself
(``clean``). An example on which the intervention is undefined (``resample`` on an example
without a spurious counterfactual) has ``NaN`` effects and is left out of every mean.
Aggregating effects into spuriousness, selectivity and confidence intervals is
``icp_lens.scoring.spuriousness``; keeping per-example values is what makes bootstrap
intervals and harm weights (``w(x, I)``) possible.

``InterventionSpec`` names the intervention a scorer applies to each feature:

``resample``          patch from the example's spurious counterfactual (the default);
``resample_causal``   patch from the example's causal counterfactual;
``zero``              ablate;
``mean``              mean over the probe set's prompts (all positions pooled);
``scale:ALPHA``       multiply by ALPHA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from icp_lens.devices import input_device
from icp_lens.features import Feature
from icp_lens.interventions import Mean, means_over
from icp_lens.model import HookedModel
from icp_lens.probeset import ProbeBatch, ProbeSet

__all__ = [
    "InterventionKind",
    "InterventionSpec",
    "Effects",
    "probe_means",
    "counterfactual_tokens",
    "check_batches",
]

InterventionKind = Literal["resample", "resample_causal", "zero", "mean", "scale"]
INTERVENTION_KINDS: tuple[str, ...] = get_args(InterventionKind)


@dataclass(frozen=True)
class InterventionSpec:
    """Which intervention a scorer applies to each feature (see the module docstring)."""

    kind: InterventionKind = "resample"
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in INTERVENTION_KINDS:
            raise ValueError(
                f"Unknown intervention {self.kind!r}; valid: {list(INTERVENTION_KINDS)} (scale as 'scale:ALPHA')"
            )

    @classmethod
    def parse(cls, text: str | InterventionSpec) -> InterventionSpec:
        """``"resample"``, ``"resample_causal"``, ``"zero"``, ``"mean"`` or ``"scale:0.5"``."""
        if isinstance(text, InterventionSpec):
            return text
        name, _, arg = str(text).partition(":")
        if name == "scale":
            try:
                return cls("scale", float(arg))
            except ValueError:
                raise ValueError(f"scale needs a factor, e.g. 'scale:0.5'; got {text!r}") from None
        if arg:
            raise ValueError(f"Intervention {name!r} takes no argument; got {text!r}")
        return cls(name)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        """The name used in tables and on the command line (``parse`` reads it back)."""
        return f"scale:{self.alpha:g}" if self.kind == "scale" else self.kind

    @property
    def counterfactual(self) -> Literal["spurious", "causal"] | None:
        """Which counterfactual the intervention patches from, if any."""
        return {"resample": "spurious", "resample_causal": "causal"}.get(self.kind)  # type: ignore[return-value]


#: estimators whose values are non-negative ranking scores, not signed effects ``dP``
UNSIGNED_ESTIMATORS: tuple[str, ...] = ("graddrop", "atp*")


@dataclass(frozen=True, eq=False)
class Effects:
    """``dP`` for each feature and probe example under one intervention.

    ``estimator`` names how the values were obtained: ``"exact"`` (patching), ``"atp"``,
    ``"atp+qk"`` (AtP with the QK fix), ``"ig"``, or ``"graddrop"`` / ``"atp*"`` (GradDrop
    without / with the QK fix), whose values are non-negative ranking scores rather than
    signed effects (``signed`` is False; see ``icp_lens.scoring.atp_star``). Default:
    ``"exact"`` or ``"atp"`` by ``exact``.
    """

    features: tuple[Feature, ...]
    intervention: str
    values: Float[Tensor, "n_features n_examples"]
    clean: Float[Tensor, " n_examples"]
    exact: bool
    metric: str = "logit_diff"
    estimator: str | None = None

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.features), self.clean.shape[0]):
            raise ValueError(
                f"Effects.values has shape {tuple(self.values.shape)}; expected "
                f"({len(self.features)}, {self.clean.shape[0]}) = (features, examples)"
            )
        if self.estimator is None:
            object.__setattr__(self, "estimator", "exact" if self.exact else "atp")

    @property
    def signed(self) -> bool:
        """Whether ``values`` are signed effects ``dP`` (False for GradDrop's magnitudes)."""
        return self.estimator not in UNSIGNED_ESTIMATORS

    def subset(self, features: Sequence[Feature]) -> Effects:
        """The effects of some of the features, in the given order."""
        row = {f: i for i, f in enumerate(self.features)}
        missing = [str(f) for f in features if f not in row]
        if missing:
            raise KeyError(f"No effects for {missing[:5]}")
        index = torch.tensor([row[f] for f in features], dtype=torch.long, device=self.values.device)
        return Effects(
            tuple(features), self.intervention, self.values[index], self.clean, self.exact, self.metric, self.estimator
        )


def counterfactual_tokens(batch: ProbeBatch, which: Literal["spurious", "causal"]) -> Tensor:
    """The batch's counterfactual prompts, with a clear error where the probes have none."""
    tokens = batch.spurious if which == "spurious" else batch.causal
    if tokens is None:
        raise ValueError(
            f"This intervention patches from the {which} counterfactual, but probe examples "
            f"{batch.index.tolist()[:5]} have no '{which}_counterfactual'"
        )
    return tokens


def check_batches(
    batches: Sequence[ProbeBatch], spec: InterventionSpec, positions: Sequence[int] | None
) -> tuple[int, ...] | None:
    """Check that ``spec`` at ``positions`` can be applied to the probe ``batches``; the positions as ints.

    Every position (negative counts from the end) must lie within the *shortest* probe
    prompt, so it means a position in every prompt (``IndexError`` otherwise). A
    ``resample`` intervention needs its counterfactual (spurious or causal) on at least
    one probe example (``ValueError`` otherwise); examples without it are the scorer's to
    skip (``NaN`` effects). Returns ``positions`` as a tuple of ints (None: all positions).
    """
    if positions is not None:
        positions = tuple(int(p) for p in positions)
        min_len = min(b.tokens.shape[1] for b in batches)
        out = [p for p in positions if not -min_len <= p < min_len]
        if out:
            raise IndexError(f"positions {out} out of range: the shortest probe prompt has {min_len} tokens")
    which = spec.counterfactual
    if which is not None and not any(getattr(b, which) is not None for b in batches):
        raise ValueError(
            f"Intervention {spec.label!r} patches from the {which} counterfactual, but no probe example "
            f"has a '{which}_counterfactual'; use another intervention (zero, mean, scale:ALPHA) or other probes"
        )
    return positions


def probe_means(
    model: HookedModel, probes: ProbeSet, features: Sequence[Feature], *, batch_size: int = 32
) -> dict[Feature, Mean]:
    """Mean-ablation values: each feature's mean over all probe prompts and positions (streamed)."""
    device = input_device(model)
    return means_over(model, features, (batch.tokens for batch in probes.batches(batch_size, device=device)))

"""``score``: the scoring entry point (hybrid by default).

Exact patching costs one forward pass per feature and intervention (hours for the 46k
MLP neurons of a 135M model on a CPU); attribution patching scores every feature from
one forward and one backward pass but is a first-order estimate that fails where the
model is far from linear (saturated attention, large activations). The hybrid takes the
best of both: attribution ranks everything, exact patching *verifies* the top
candidates, and the table says which scores are exact and which are estimates
(column ``exact``).

    table = score(model, probes)                              # hybrid, neurons and heads
    table = score(model, probes, method="exact", kinds=["head"])
    table.select(top_k=20)

When the probes carry causal counterfactuals, the causal effect of every feature is
scored the same way (``resample_causal``) and turned into a ``selectivity`` column.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from icp_lens.features import Feature, FeatureKind, enumerate_features
from icp_lens.metrics import Metric
from icp_lens.model import HookedModel
from icp_lens.probeset import ProbeSet
from icp_lens.scoring.effects import Effects, InterventionSpec, probe_means
from icp_lens.scoring.spuriousness import Weight
from icp_lens.scoring.table import ScoreTable

__all__ = ["Method", "METHODS", "score", "all_features"]

Method = Literal["hybrid", "attribution", "exact"]
METHODS: tuple[str, ...] = ("hybrid", "attribution", "exact")


def all_features(
    model: HookedModel, kinds: Sequence[FeatureKind], layers: Sequence[int] | None = None
) -> list[Feature]:
    """Every feature of the given kinds (and layers), in (kind, layer, index) order."""
    if not kinds:
        raise ValueError("Give at least one feature kind")
    return [
        f for kind in kinds for f in enumerate_features(model, kind, layers=None if layers is None else list(layers))
    ]


def _verify_count(verify_top: int | float, n: int) -> int:
    if isinstance(verify_top, float) and 0 < verify_top <= 1:
        return max(1, round(verify_top * n))
    if isinstance(verify_top, int) and verify_top >= 0:
        return min(verify_top, n)
    raise ValueError(f"verify_top must be a count >= 0 or a fraction in (0, 1]; got {verify_top!r}")


def score(
    model: HookedModel,
    probes: ProbeSet,
    *,
    method: Method = "hybrid",
    kinds: Sequence[FeatureKind] = ("neuron", "head"),
    layers: Sequence[int] | None = None,
    features: Sequence[Feature] | None = None,
    interventions: Sequence[str | InterventionSpec] = ("resample",),
    verify_top: int | float = 100,
    causal: bool | None = None,
    metric: str | Metric = "logit_diff",
    weight: Weight = "uniform",
    batch_size: int = 32,
    n_boot: int = 200,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    qk_fix: bool = False,
    grad_drop: bool = False,
) -> ScoreTable:
    """Score features by spuriousness; see the module docstring.

    ``interventions`` are the spurious interventions averaged into ``S``; ``causal``
    (default: when every probe has a causal counterfactual) adds the selectivity column;
    ``verify_top`` is how many top features (or which fraction) the hybrid verifies
    exactly; ``checkpoint_dir`` keeps partial exact results so an interrupted run resumes.
    ``qk_fix`` / ``grad_drop``: the AtP* options of the attribution estimates
    (:mod:`icp_lens.scoring.attribution`); the exactly verified rows are unaffected.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid: {list(METHODS)}")
    feats = list(features) if features is not None else all_features(model, kinds, layers)
    specs = [InterventionSpec.parse(i) for i in interventions]
    if not specs or any(s.kind == "resample_causal" for s in specs):
        raise ValueError("interventions must be non-empty and spurious; the causal effect is added by causal=True")
    if causal is None:
        causal = probes.has_causal
    elif causal and not any(e.causal_counterfactual for e in probes.examples):
        raise ValueError("causal=True needs probes with causal counterfactuals")
    all_specs = specs + ([InterventionSpec("resample_causal")] if causal else [])
    means = probe_means(model, probes, feats, batch_size=batch_size) if any(s.kind == "mean" for s in specs) else None
    common: dict[str, Any] = dict(metric=metric, batch_size=batch_size, means=means, progress=progress)

    def run(kind: Literal["exact", "attribution"], spec: InterventionSpec, subset: list[Feature]) -> Effects:
        if kind == "attribution":
            from icp_lens.scoring.attribution import attribution_effects

            return attribution_effects(model, probes, subset, spec, qk_fix=qk_fix, grad_drop=grad_drop, **common)
        from icp_lens.scoring.exact import exact_effects

        checkpoint = None
        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            checkpoint = Path(checkpoint_dir) / f"exact_{spec.label.replace(':', '_')}.pt"
        return exact_effects(model, probes, subset, spec, checkpoint=checkpoint, **common)

    def table(kind: Literal["exact", "attribution"], subset: list[Feature]) -> ScoreTable:
        effects = [run(kind, s, subset) for s in all_specs]
        spurious, causal_effects = effects[: len(specs)], (effects[len(specs)] if causal else None)
        return ScoreTable.from_effects(spurious, causal=causal_effects, weight=weight, n_boot=n_boot, seed=seed)

    if method != "hybrid":
        return table(method, feats)
    estimate = table("attribution", feats)
    n_verify = _verify_count(verify_top, len(feats))
    if n_verify == 0:
        return estimate
    verified = table("exact", estimate.features[:n_verify]).frame
    rest = estimate.frame[~estimate.frame["feature"].isin(set(verified["feature"]))]
    import pandas as pd

    return ScoreTable(pd.concat([verified, rest], ignore_index=True))

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

Two more kinds join the same table: ``direction`` (directions fitted on the probes, see
``icp_lens.directions``; ``directions=`` says how, a source name, a ``DirectionFit`` or a fitted
``DirectionSet``; scored exactly, or by attribution with ``method="attribution"``; the
vectors travel with the table and are saved beside it) and ``token`` (input-embedding
rows, ``icp_lens.scoring.tokens``; always exact; ``layer`` 0, ``index`` the token id):

    table = score(model, probes, kinds=["direction", "token", "head"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from icp_lens.distributed import Ranks, current, gather_rows, split
from icp_lens.features import Feature, FeatureKind, enumerate_features
from icp_lens.metrics import Metric
from icp_lens.model import HookedModel
from icp_lens.probeset import ProbeSet
from icp_lens.scoring.effects import Effects, InterventionSpec, probe_means
from icp_lens.scoring.shards import check_shard, shard_share
from icp_lens.scoring.spuriousness import Weight
from icp_lens.scoring.table import ScoreTable

__all__ = ["Method", "METHODS", "score", "all_features", "concat_tables"]

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


def check_layers(model: HookedModel, layers: Sequence[int]) -> None:
    """Refuse an empty layer list or a layer the model does not have, naming the valid range."""
    from icp_lens.model import model_dims

    n = model_dims(model).n_layers
    if len(layers) == 0:
        raise ValueError(f"layers is empty; the model has {n} layers, 0-{n - 1}")
    bad = sorted({int(x) for x in layers if not 0 <= int(x) < n})
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} layers, 0-{n - 1}")


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
    directions: Any = None,
    shard: tuple[int, int] | None = None,
    distributed: bool = True,
    features_per_pass: int = 64,
) -> ScoreTable:
    """Score features by spuriousness; see the module docstring.

    ``interventions`` are the spurious interventions averaged into ``S``; ``causal``
    (default: when every probe has a causal counterfactual) adds the selectivity column;
    ``verify_top`` is how many top features (or which fraction) the hybrid verifies
    exactly; ``checkpoint_dir`` keeps partial exact results so an interrupted run resumes.
    ``qk_fix`` / ``grad_drop``: the AtP* options of the attribution estimates
    (:mod:`icp_lens.scoring.attribution`); the exactly verified rows are unaffected.
    ``features_per_pass``: the exact passes patch up to that many features at once
    (``batch_size`` examples times that many rows per forward pass); on running out of
    memory the pass is halved and retried, finished chunks kept
    (:func:`~icp_lens.scoring.exact.exact_effects`). The table does not depend on it.

    ``shard=(i, n)`` scores shard ``i`` of ``n`` (0-based) and returns its partial table, for
    job arrays (one shard per GPU or node); :func:`icp_lens.scoring.shards.merge_tables`
    joins the ``n`` parts into the table one run writes. Exact and attribution: the
    features ``i, i+n, i+2n, ...`` of the full list. Hybrid: every shard ranks all features
    by attribution (the cheap part, identical in every shard), then verifies the ranks
    ``i, i+n, ...`` of the top ``verify_top`` exactly; shard 0 also keeps the attribution
    rows of the features outside the top. Each feature's row depends on that feature and
    the probes only (the bootstrap resamples examples with the same seed for every row),
    so the merged table equals the one-run table.

    Inside a ``torch.distributed`` process group (``torchrun``; :mod:`icp_lens.distributed`)
    and with ``distributed`` left on, the ranks share the work and every rank returns the
    one-process table: exact scoring is feature-parallel (rank ``r`` patches the features
    ``r, r+N, ...``, resuming from its own ``checkpoint_dir`` file), attribution is
    data-parallel (rank ``r`` takes the probe batches ``r, r+N, ...``), and the hybrid ranks
    by data-parallel attribution, then verifies its top feature-parallel. Every feature's
    (example's) numbers come from one rank and are summed with zeros from the others, so
    the table equals the one-process table. ``shard`` turns this off (a job-array shard
    is one process's share already).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid: {list(METHODS)}")
    if features_per_pass < 1:
        raise ValueError(f"features_per_pass must be >= 1, got {features_per_pass}")
    if shard is not None:
        check_shard(shard)
        if any(k in ("direction", "token") for k in kinds) and features is None:
            raise ValueError("--shard splits neuron/head/... features; score direction and token kinds in one "
                             "unsharded run (they are fitted or scored together)")  # fmt: skip
    if layers is not None:
        check_layers(model, layers)
    extra = [k for k in kinds if k in ("direction", "token")]
    if extra and features is None:
        unit_kinds = [k for k in kinds if k not in extra]
        tables = [_score_extra(model, probes, k, method=method, layers=layers, directions=directions, causal=causal,
                               metric=metric, batch_size=batch_size, n_boot=n_boot, seed=seed, progress=progress)
                  for k in extra]  # fmt: skip
        if unit_kinds:
            tables.append(
                score(model, probes, method=method, kinds=unit_kinds, layers=layers, interventions=interventions,
                      verify_top=verify_top, causal=causal, metric=metric, weight=weight, batch_size=batch_size,
                      n_boot=n_boot, seed=seed, checkpoint_dir=checkpoint_dir, progress=progress, qk_fix=qk_fix,
                      grad_drop=grad_drop, features_per_pass=features_per_pass)
            )  # fmt: skip
        return concat_tables(tables)
    feats = list(features) if features is not None else all_features(model, kinds, layers)
    if shard is not None and method != "hybrid":
        feats = shard_share(feats, shard)
        if not feats:
            raise ValueError(f"shard {shard[0]}/{shard[1]} gets no feature: there are fewer features than shards")
    specs = [InterventionSpec.parse(i) for i in interventions]
    if not specs or any(s.kind == "resample_causal" for s in specs):
        raise ValueError("interventions must be non-empty and spurious; the causal effect is added by causal=True")
    if causal is None:
        causal = probes.has_causal
    elif causal and not any(e.causal_counterfactual for e in probes.examples):
        raise ValueError("causal=True needs probes with causal counterfactuals")
    all_specs = specs + ([InterventionSpec("resample_causal")] if causal else [])
    means = probe_means(model, probes, feats, batch_size=batch_size) if any(s.kind == "mean" for s in specs) else None
    ranks = current() if distributed and shard is None else None
    progress = progress and (ranks is None or ranks.main)
    common: dict[str, Any] = dict(metric=metric, batch_size=batch_size, means=means, progress=progress)

    def run(kind: Literal["exact", "attribution"], spec: InterventionSpec, subset: list[Feature]) -> Effects:
        if kind == "attribution":
            from icp_lens.scoring.attribution import attribution_effects

            return attribution_effects(model, probes, subset, spec, qk_fix=qk_fix, grad_drop=grad_drop,
                                       data_parallel=ranks is not None, **common)  # fmt: skip
        from icp_lens.scoring.exact import exact_effects

        checkpoint = None
        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            rank = "" if ranks is None else f".rank-{ranks.rank}-of-{ranks.world_size}"
            checkpoint = Path(checkpoint_dir) / f"exact_{spec.label.replace(':', '_')}{rank}.pt"
        fpp = {"features_per_pass": features_per_pass}
        if ranks is None:
            return exact_effects(model, probes, subset, spec, checkpoint=checkpoint, **fpp, **common)
        return _feature_parallel(model, probes, subset, spec, ranks, checkpoint=checkpoint, **fpp, **common)

    def table(kind: Literal["exact", "attribution"], subset: list[Feature]) -> ScoreTable:
        effects = [run(kind, s, subset) for s in all_specs]
        spurious, causal_effects = effects[: len(specs)], (effects[len(specs)] if causal else None)
        return ScoreTable.from_effects(spurious, causal=causal_effects, weight=weight, n_boot=n_boot, seed=seed)

    if method != "hybrid":
        return table(method, feats)
    estimate = table("attribution", feats)
    n_verify = _verify_count(verify_top, len(feats))
    if n_verify == 0:
        return estimate if shard is None or shard[0] == 0 else ScoreTable(estimate.frame.iloc[:0])
    top = estimate.features[:n_verify]
    share = top if shard is None else shard_share(top, shard)
    verified = table("exact", share).frame if share else estimate.frame.iloc[:0]
    rest = estimate.frame[~estimate.frame["feature"].isin({str(f) for f in top})]
    if shard is not None and shard[0] != 0:
        rest = rest.iloc[:0]
    import pandas as pd

    return ScoreTable(pd.concat([verified, rest], ignore_index=True))


def _feature_parallel(
    model: HookedModel,
    probes: ProbeSet,
    features: list[Feature],
    spec: InterventionSpec,
    ranks: Ranks,
    **kwargs: Any,
) -> Effects:
    """Exact effects of ``features`` with the ranks sharing them (every rank gets all rows)."""
    from icp_lens.scoring.exact import exact_effects

    mine = split(range(len(features)), ranks)
    n_examples = len(probes)
    if mine:
        local = exact_effects(model, probes, [features[i] for i in mine], spec, **kwargs)
        values, clean = local.values, local.clean
    else:  # more ranks than features: this one only adds zeros
        values, clean = torch.zeros((0, n_examples), device="cpu"), torch.zeros(n_examples, device="cpu")  # as exact's
    values = gather_rows(values.float(), mine, len(features))
    clean = gather_rows(clean.float()[None], [0] if ranks.main else [], 1)[0]  # rank 0 always has a feature
    metric = kwargs.get("metric", "logit_diff")
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    return Effects(tuple(features), spec.label, values, clean, exact=True, metric=name)


def concat_tables(tables: Sequence[ScoreTable]) -> ScoreTable:
    """One table from several (units, tokens, directions), the direction vectors kept."""
    import pandas as pd

    frames = [t.frame for t in tables if len(t.frame)]
    sets = [t.directions for t in tables if t.directions is not None]
    directions = None
    for d in sets:
        directions = d if directions is None else directions.concat(d)
    frame = pd.concat(frames, ignore_index=True) if frames else tables[0].frame
    return ScoreTable(frame, directions)


def _score_extra(
    model: HookedModel,
    probes: ProbeSet,
    kind: str,
    *,
    method: Method,
    layers: Sequence[int] | None,
    directions: Any,
    causal: bool | None,
    metric: str | Metric,
    batch_size: int,
    n_boot: int,
    seed: int,
    progress: bool,
) -> ScoreTable:
    """Score token-embedding rows or fitted directions into ScoreTable rows."""
    import pandas as pd

    if kind == "token":
        from icp_lens.scoring.tokens import score_tokens

        tokens = score_tokens(model, probes, metric=metric, n_boot=n_boot, seed=seed, progress=progress).frame
        frame = pd.DataFrame({
            "kind": "token", "layer": 0, "index": tokens["index"].astype(int), "hook_name": "hook_embed",
            "site": "", "feature": [f"token {int(i)}" for i in tokens["index"]], "score": tokens["score"],
            "ci_low": tokens["ci_low"], "ci_high": tokens["ci_high"], "selectivity": tokens["selectivity"],
            "exact": True, "estimator": "exact", "effect_resample": tokens["score"],
            "effect_resample_causal": tokens.get("causal"), "n_examples": tokens["n_examples"],
            "token": tokens.get("token"),
        })  # fmt: skip
        return ScoreTable(frame)
    from icp_lens.directions import DirectionFit, DirectionSet, direction_effects, fit_directions

    if isinstance(directions, DirectionSet):
        dirs = directions
    else:
        if isinstance(directions, str):  # a source name: "leace", "diff-means" or "probe"
            fit = DirectionFit(source=directions)
        elif directions is None or isinstance(directions, DirectionFit):
            fit = directions or DirectionFit()
        else:
            raise TypeError(
                f"directions= takes a DirectionFit, a DirectionSet or a source name, not {type(directions).__name__}"
            )
        if layers is not None and fit.layers is None:
            fit = DirectionFit(**{**fit.__dict__, "layers": tuple(layers)})
        dirs = fit_directions(model, probes, fit, metric=metric)
    exact = method != "attribution"
    common: dict[str, Any] = dict(metric=metric, exact=exact, batch_size=batch_size, progress=progress)
    spurious = direction_effects(model, probes, dirs, "resample", **common)
    use_causal = probes.has_causal if causal is None else causal
    causal_effects = direction_effects(model, probes, dirs, "resample_causal", **common) if use_causal else None
    table = ScoreTable.from_effects([spurious], causal=causal_effects, n_boot=n_boot, seed=seed)
    frame = table.frame
    cos = {str(d.feature): d.cos_causal for d in dirs}
    frame["cos_causal"] = frame["feature"].map(cos)
    frame["source"] = dirs.info.get("source", "")
    return ScoreTable(frame, dirs)

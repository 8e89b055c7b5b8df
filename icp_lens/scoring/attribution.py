"""Attribution patching: gradient estimates of every feature's effect from one backward pass.

Exact patching (``icp_lens.scoring.exact``) runs one forward pass per feature. Attribution
patching (AtP; Nanda 2023, Kramár et al. 2024) replaces it by a first-order Taylor
expansion around the clean run. For a feature ``f`` with clean activation ``a_f`` and
intervened value ``I(a_f)``,

    dP(x, f, I)  ~=  sum over patched positions and f's units of  dP/da_f(x) * (I(a_f) - a_f).

One forward pass with gradient-tracking leaves at the needed hook points and one backward
pass (gradients with respect to *activations* only; parameters never receive ``.grad``)
give ``dP/da`` for every unit of every hook at once, so one batch scores all features of
all requested kinds and layers. ``I(a_f) - a_f`` is ``-a_f`` for ``zero``, ``(alpha - 1) a_f``
for ``scale:ALPHA``, ``mean - a_f`` for ``mean`` (the probe-set mean, or ``means``) and
``a_f(x_cf) - a_f(x)`` for ``resample`` / ``resample_causal``, which costs one more
(gradient-free) forward pass on the counterfactual prompts.

AtP is exact when ``P`` is linear in the activation along the patch, and accurate when
one feature's patch moves the model little (most single neurons). It degrades where the
patch is large and the path from the feature to ``P`` curves: a head whose output moves
a later attention softmax or a layer norm a long way, a metric such as ``answer_prob``
near saturation, and ``kl``, whose gradient at the clean run is exactly zero (AtP of
``kl`` is refused: use ``method="ig"``). On the planted-shortcut organisms
(``benchmarks/bench_attribution.py``, resample from the spurious counterfactual) AtP
ranks all neurons as exact patching does (Spearman 1.00), but underestimates the
layer-0 heads that carry the shortcut by 25-60%.

``method="ig"`` -- integrated gradients along the straight line from the clean to the
intervened activation: the patched units are moved to ``a + t (I(a) - a)`` for
``ig_steps`` midpoints ``t = (k + 1/2) / ig_steps`` while the rest of the model runs
normally, and the gradients at those points are averaged and multiplied by
``I(a) - a`` (midpoint rule). What moves along one path is the choice ``ig_paths``:

* ``"hook"`` (default, the standard cheap approximation): all requested features *of one
  hook point* move together, one path per hook. Their effects then sum to the exact
  effect of patching them all at once (IG's completeness, up to the midpoint rule's
  error), but a single feature's score is its share of that joint patch, not its own
  single-feature effect: where the joint patch is large (a whole layer's neurons moved
  from the clean to the counterfactual run) the gradients along the path are not those
  around the clean run, and the ranking of small single-feature effects can come out
  *worse* than AtP's. Cost: ``ig_steps`` forward + backward passes per hook point.
* ``"feature"``: one path per feature, that feature alone moving. This converges to the
  exact single-feature effect as ``ig_steps`` grows, at ``ig_steps`` forward + backward
  passes per *feature* (packed along the batch, up to 4,096 rows a pass): affordable
  for heads and value vectors, where AtP fails most, not for every neuron of a large
  model.

Different hooks are never interpolated together (a later hook's value must stay a
function of the earlier ones for gradients to flow through it). Requesting a single
feature makes the two choices identical.

AtP* (Kramár et al. 2024) -- two options of ``method="atp"``, explained in
``icp_lens.scoring.atp_star``:

* ``qk_fix=True``: for ``query`` and ``key`` features (``hook_q``/``hook_k``) the head's
  attention pattern is recomputed exactly with the patched query or key, and only what
  follows the pattern is linearised: ``dP ~= sum dP/dA * (A' - A)`` over the head's
  pattern entries. Saturated heads, whose softmax gradient is near zero, are no longer
  scored near zero. Other kinds are scored by plain AtP. Estimator ``"atp+qk"``.
  Cost: up to two extra partial forward passes per batch.
* ``grad_drop=True``: the AtP estimate is recomputed once per block ``l`` with the
  gradient through that block's attention and MLP outputs zeroed, and the score is
  ``1/(L-1) sum_l |AtP_{-l}|``: a non-negative *ranking* score that finds features whose
  paths cancel in the gradient (AtP near zero, exact effect not), not a signed estimate.
  Estimator ``"graddrop"`` (``"atp*"`` together with ``qk_fix``); ``Effects.signed`` is
  False and sign-reading weights are refused. Cost: ``L`` backward passes per batch.

Both need a gradient at the clean run (not ``kl``) and are refused with ``method="ig"``
(IG's paths already go beyond first order). Where neither suffices, exact patching of
the top candidates (``score(method="hybrid")``) is the ground truth.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from icp_lens.devices import input_device
from icp_lens.distributed import all_reduce_sum, current, split
from icp_lens.features import Feature, validate_features
from icp_lens.hooks import capturing, hooked
from icp_lens.interventions import Mean
from icp_lens.metrics import Metric, get_metric
from icp_lens.model import HookedModel, model_dims
from icp_lens.probeset import ProbeBatch, ProbeSet
from icp_lens.scoring.atp_star import QK_KINDS, GradDrop, QKFix, atp_batch
from icp_lens.scoring.effects import Effects, InterventionSpec, check_batches, counterfactual_tokens, probe_means

__all__ = ["AttributionMethod", "IGPaths", "attribution_effects"]

AttributionMethod = Literal["atp", "ig"]
IGPaths = Literal["hook", "feature"]
_IG_MAX_ROWS = 4096  # rows of one IG forward pass (paths x steps x batch)


@contextmanager
def _activation_grads_only(model: HookedModel) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter and turn grad mode on; restore both."""
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)


def _position_index(positions: tuple[int, ...] | None, seq_len: int, device: torch.device) -> Tensor | None:
    if positions is None:
        return None
    bad = [p for p in positions if not -seq_len <= p < seq_len]
    if bad:
        raise IndexError(f"positions {bad} out of range for a sequence of length {seq_len}")
    return torch.tensor(sorted({p % seq_len for p in positions}), dtype=torch.long, device=device)


class _Plan:
    """Which units of which hook are scored, and the intervened value of each hook."""

    def __init__(self, features: Sequence[Feature], spec: InterventionSpec, means: Mapping[Feature, Any] | None):
        self.features = tuple(features)
        self.spec = spec
        self.rows: dict[str, list[int]] = {}  # hook name -> positions in ``features`` (one pass)
        for i, f in enumerate(self.features):
            self.rows.setdefault(f.hook_name, []).append(i)
        self.names = sorted(self.rows)
        self.units: dict[str, Tensor] = {
            n: torch.tensor(sorted({self.features[i].index for i in self.rows[n]}), dtype=torch.long, device="cpu")
            for n in self.names
        }
        self.means = means
        self.kinds = {f.hook_name: (f.kind, f.layer) for f in self.features}
        self._mean_cache: dict[tuple[str, int], Tensor] = {}

    def mean_target(self, name: str, clean: Tensor) -> Tensor:
        """The mean values of the scored units of ``name``, shaped like ``clean`` (others: clean)."""
        assert self.means is not None
        key = (name, clean.shape[1])
        if key not in self._mean_cache:
            units = self.units[name].tolist()
            values = [self.means[Feature(*self.kinds[name], i)] for i in units]  # type: ignore[arg-type]
            per_pos = any(isinstance(v, Mean) and v.per_position for v in values)
            stacked = []
            for f_index, v in zip(units, values, strict=True):
                tensor = (v.value if isinstance(v, Mean) else torch.as_tensor(v, device=clean.device)).to(clean)
                if isinstance(v, Mean) and v.per_position:
                    if tensor.shape[0] != clean.shape[1]:
                        raise ValueError(
                            f"Per-position mean of {Feature(*self.kinds[name], f_index)} has {tensor.shape[0]} "
                            f"positions, the probe batch {clean.shape[1]}; refit or use per_position=False"
                        )
                shape = ((clean.shape[1],) if per_pos else ()) + tuple(clean.shape[3:])
                stacked.append(tensor.expand(shape))
            self._mean_cache[key] = torch.stack(stacked, dim=1 if per_pos else 0)
        target = clean.clone()
        target[:, :, self.units[name].to(clean.device)] = self._mean_cache[key]
        return target

    def deltas(
        self,
        model: HookedModel,
        batch: ProbeBatch,
        clean: dict[str, Tensor],
        positions: tuple[int, ...] | None,
    ) -> dict[str, Tensor] | None:
        """``I(a) - a`` per hook, zero outside the patched positions and the scored units.

        None where the intervention is undefined: a right-aligned counterfactual with no
        counterpart for any patched position.
        """
        seq_len = batch.tokens.shape[1]
        kind = self.spec.kind
        pos = _position_index(positions, seq_len, batch.tokens.device)
        if kind in ("resample", "resample_causal"):
            cf = counterfactual_tokens(batch, self.spec.counterfactual)  # type: ignore[arg-type]
            if cf.shape[1] < seq_len:
                wanted = torch.arange(seq_len, device="cpu") if pos is None else pos.cpu()
                if not bool((wanted >= seq_len - cf.shape[1]).any()):
                    return None
            with torch.no_grad(), capturing(model, self.names) as store:
                model(cf)
            targets = {}
            for name in self.names:
                src, cl = store[name], clean[name]
                if src.shape[1] == seq_len:
                    targets[name] = src
                else:  # right-aligned counterfactual: unmatched positions stay clean
                    t = cl.clone()
                    n = min(seq_len, src.shape[1])
                    t[:, seq_len - n :] = src[:, src.shape[1] - n :]
                    targets[name] = t
        out: dict[str, Tensor] = {}
        for name in self.names:
            a = clean[name]
            if kind in ("resample", "resample_causal"):
                delta = targets[name] - a
            elif kind == "zero":
                delta = -a
            elif kind == "scale":
                delta = (self.spec.alpha - 1.0) * a
            else:  # mean
                delta = self.mean_target(name, a) - a
            mask = torch.zeros(a.shape[1], a.shape[2], dtype=a.dtype, device=a.device)
            units = self.units[name].to(a.device)
            if pos is None:
                mask[:, units] = 1.0
            else:
                mask[pos.to(a.device)[:, None], units[None, :]] = 1.0
            out[name] = delta * mask.view(1, *mask.shape, *([1] * (a.dim() - 3)))
        return out

    def reduce(self, name: str, contrib: Tensor) -> Tensor:
        """``[batch, pos, n, ...]`` -> ``[batch, n]``: sum over positions and a unit's dims."""
        per_unit = contrib.float().sum(1)
        return per_unit.flatten(2).sum(2) if per_unit.dim() > 2 else per_unit


def _metric_values(metric: Metric, logits: Tensor, batch: ProbeBatch, clean_last: Tensor) -> Tensor:
    out = metric(logits[:, -1], batch, clean_last)
    if out.shape != (logits.shape[0],):
        raise ValueError(f"The metric returned shape {tuple(out.shape)}; expected ({logits.shape[0]},)")
    return out


def _tile(batch: ProbeBatch, k: int) -> ProbeBatch:
    """The batch repeated ``k`` times along the batch dimension (what the metric reads)."""
    return ProbeBatch(
        index=batch.index.repeat(k),
        tokens=batch.tokens.repeat(k, 1),
        answer=batch.answer.repeat(k),
        alternatives=batch.alternatives.repeat(k, 1),
        spurious=None,
        causal=None,
        causal_answer=batch.causal_answer.repeat(k) if batch.causal_answer is not None else None,
        groups=batch.groups * k,
    )


def _ig_batch(
    model: HookedModel,
    plan: _Plan,
    batch: ProbeBatch,
    metric: Metric,
    positions: tuple[int, ...] | None,
    steps: int,
    paths: IGPaths,
) -> tuple[dict[str, Tensor] | None, Tensor]:
    with torch.no_grad(), capturing(model, plan.names) as store:
        logits = model(batch.tokens)
        clean = dict(store)
    clean_last = logits[:, -1]
    clean_values = _metric_values(metric, logits, batch, clean_last)
    deltas = plan.deltas(model, batch, clean, positions)
    if deltas is None:
        return None, clean_values
    n = batch.size
    t = (torch.arange(steps, dtype=torch.float32, device=batch.tokens.device) + 0.5) / steps
    per_pass = max(1, _IG_MAX_ROWS // (steps * n))  # paths packed into one forward pass
    scores = {}
    for name in plan.names:
        delta = deltas[name]  # [n, pos, units, *unit], zero outside the scored units/positions
        units = plan.units[name].to(delta.device)
        score = torch.zeros(n, delta.shape[2], device=delta.device)
        n_paths = 1 if paths == "hook" else len(units)
        for start in range(0, n_paths, per_pass):
            if paths == "hook":  # one path: every scored unit of the hook moves together
                path_delta = delta.unsqueeze(0)
            else:  # path j moves unit units[j] alone
                chunk = units[start : start + per_pass]
                path_delta = torch.zeros(len(chunk), *delta.shape, dtype=delta.dtype, device=delta.device)
                paths_at = torch.arange(len(chunk), device=delta.device)
                path_delta[paths_at, :, :, chunk] = delta[:, :, chunk].movedim(2, 0)
            k = path_delta.shape[0]
            shape = (1, steps) + (1,) * delta.dim()
            moved = (t.to(delta).view(shape) * path_delta.unsqueeze(1)).flatten(0, 2)  # [(k steps n), ...]
            point: dict[str, Tensor] = {}

            def hook(act: Tensor, hook: Any, moved: Tensor = moved, point: dict[str, Tensor] = point) -> Tensor:
                x = (act.detach() + moved.to(act.dtype)).requires_grad_(True)
                point["x"] = x
                return x

            with hooked(model, [(name, hook)]):
                logits = model(batch.tokens.repeat(k * steps, 1))
            values = _metric_values(metric, logits, _tile(batch, k * steps), clean_last.repeat(k * steps, 1))
            (grad,) = torch.autograd.grad(values.sum(), [point["x"]])
            mean_grad = grad.view(k, steps, *delta.shape).mean(1)
            contrib = plan.reduce(name, (mean_grad * path_delta).flatten(0, 1)).view(k, n, -1)  # [k, n, units]
            if paths == "hook":
                score = contrib[0]
            else:
                score[:, chunk] = contrib[torch.arange(k, device=contrib.device), :, chunk].T
        scores[name] = score
    return scores, clean_values


def attribution_effects(
    model: HookedModel,
    probes: ProbeSet,
    features: Sequence[Feature],
    intervention: InterventionSpec | str = "resample",
    *,
    metric: str | Metric = "logit_diff",
    method: AttributionMethod = "atp",
    ig_steps: int = 8,
    ig_paths: IGPaths = "hook",
    qk_fix: bool = False,
    grad_drop: bool = False,
    positions: tuple[int, ...] | None = None,
    batch_size: int = 32,
    means: Mapping[Feature, Mean | Tensor] | None = None,
    progress: bool = True,
    data_parallel: bool = False,
) -> Effects:
    """Gradient estimates of ``dP(x, f, I)`` for every feature and probe example.

    ``method="atp"``: one forward + one backward per batch (plus one forward on the
    counterfactual for ``resample``) scores all ``features``. ``method="ig"``: integrated
    gradients with ``ig_steps`` midpoints along one path per hook point
    (``ig_paths="hook"``) or per feature (``"feature"``); see the module docstring for what
    is interpolated. AtP* options of ``method="atp"`` (module docstring): ``qk_fix``
    recomputes the attention pattern exactly for ``query``/``key`` features; ``grad_drop``
    returns GradDrop's non-negative ranking score instead of a signed estimate (both: AtP*).
    ``intervention`` and ``metric`` are as for ``exact_effects``;
    ``positions`` restricts the intervention to some positions (negative counts from the
    end; None: all); ``means`` (``probe_means``'s output) overrides the probe-set means for
    ``mean``. Examples without the needed counterfactual get ``NaN``.

    ``data_parallel=True`` inside a ``torch.distributed`` process group (torchrun; see
    :mod:`icp_lens.distributed`): this rank estimates the probe batches ``rank, rank + N,
    ...`` and the per-example values are summed across ranks, so every rank returns the
    full ``Effects`` of a one-process run. Outside a group it changes nothing.

    Returns ``Effects`` with ``exact=False``, ``values`` ``[n_features, n_examples]`` in
    probe-set order, and ``estimator`` one of ``"atp"``, ``"atp+qk"``, ``"graddrop"``,
    ``"atp*"``, ``"ig"``. Parameters never receive ``.grad``; their ``requires_grad`` flags and
    the global grad mode are restored, so this runs inside ``torch.no_grad()`` too.
    """
    spec = InterventionSpec.parse(intervention)
    if method not in ("atp", "ig"):
        raise ValueError(f"Unknown attribution method {method!r}; valid: ['atp', 'ig']")
    if ig_paths not in ("hook", "feature"):
        raise ValueError(f"Unknown ig_paths {ig_paths!r}; valid: ['hook', 'feature']")
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    if method == "ig" and (qk_fix or grad_drop):
        raise ValueError(
            f"qk_fix and grad_drop are options of method='atp' (AtP*); got method='ig' with qk_fix={qk_fix}, "
            f"grad_drop={grad_drop}. Valid: method='atp' with any of qk_fix/grad_drop, or method='ig' with neither"
        )
    features = tuple(features)
    if not features:
        raise ValueError("attribution_effects needs at least one feature (e.g. enumerate_features(model, 'neuron'))")
    for f in features:
        if not isinstance(f, Feature):
            raise TypeError(f"features must be Feature objects; got {type(f).__name__} ({f!r})")
    validate_features(model, features)
    if len(set(features)) < len(features):
        dupes = sorted({str(f) for f in features if features.count(f) > 1})
        raise ValueError(f"Duplicate features: {dupes[:5]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = input_device(model)
    batch_list = list(probes.batches(batch_size, device=device))
    positions = check_batches(batch_list, spec, positions)
    which = spec.counterfactual
    metric_fn = get_metric(metric)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    if method == "atp" and metric_name == "kl":
        options = " (with qk_fix/grad_drop too: both read the same zero gradient)" if qk_fix or grad_drop else ""
        raise ValueError(
            "AtP of the 'kl' metric is identically zero (KL to the clean output has zero gradient at the "
            f"clean run){options}; use method='ig' (without qk_fix/grad_drop) or exact patching"
        )
    qk = QKFix(features) if qk_fix and any(f.kind in QK_KINDS for f in features) else None
    drop = GradDrop(model_dims(model).n_layers) if grad_drop else None
    estimator = "ig" if method == "ig" else {(False, False): "atp", (True, False): "atp+qk", (False, True): "graddrop",
                                             (True, True): "atp*"}[(bool(qk_fix), bool(grad_drop))]  # fmt: skip
    if spec.kind == "mean":
        if means is None:
            means = probe_means(model, probes, features, batch_size=batch_size)
        missing = [str(f) for f in features if f not in means]
        if missing:
            raise KeyError(f"means has no value for {missing[:5]}")
    plan = _Plan(features, spec, means)
    n_examples = len(probes)
    # the results gather on the CPU (each batch's scores are moved there), whatever the model's device
    per_hook: dict[str, Tensor] = {}  # hook name -> [n_examples, n_units], NaN until scored
    clean = torch.full((n_examples,), float("nan"), device="cpu")

    ranks = current() if data_parallel else None
    mine = split(batch_list, ranks)
    with _activation_grads_only(model):
        for batch in tqdm(mine, desc=f"attribution {estimator} {spec.label}", disable=not progress, unit="batch"):
            rows = batch.index.cpu()
            if which is not None and getattr(batch, which) is None:  # NaN effects; clean is defined
                with torch.no_grad():
                    logits = model(batch.tokens)
                    clean[rows] = _metric_values(metric_fn, logits, batch, logits[:, -1]).float().cpu()
                continue
            if method == "atp":

                def metric_values(logits: Tensor, batch: ProbeBatch = batch) -> Tensor:
                    return _metric_values(metric_fn, logits, batch, logits[:, -1].detach())

                scores, clean_values = atp_batch(model, plan, batch, metric_values, positions, qk=qk, grad_drop=drop)
            else:
                scores, clean_values = _ig_batch(model, plan, batch, metric_fn, positions, ig_steps, ig_paths)
            clean[rows] = clean_values.float().cpu()
            for name, score in (scores or {}).items():
                if name not in per_hook:
                    per_hook[name] = torch.full((n_examples, score.shape[1]), float("nan"), device="cpu")
                per_hook[name][rows] = score.cpu()
    values = torch.full((len(features), n_examples), float("nan"), device="cpu")
    for name in plan.names:
        if name in per_hook:
            rows = plan.rows[name]
            units = torch.tensor([features[i].index for i in rows], dtype=torch.long, device="cpu")
            values[torch.tensor(rows, dtype=torch.long, device="cpu")] = per_hook[name][:, units].T
    if ranks is not None:  # each example was estimated by one rank: zeros elsewhere, then the sum
        owned = torch.zeros(n_examples, dtype=torch.bool, device="cpu")
        for batch in mine:
            owned[batch.index.cpu()] = True
        values = all_reduce_sum(torch.where(owned[None, :], values, 0.0))
        clean = all_reduce_sum(torch.where(owned, clean, 0.0))
    return Effects(features, spec.label, values, clean, exact=False, metric=metric_name, estimator=estimator)

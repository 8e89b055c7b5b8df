"""Effects of direction features, in the same ``Effects`` form as units (``icp_lens.scoring``).

For a direction ``(a, b)`` and an intervention, ``dP(x) = P(M(x | edit)) - P(M(x))``:

- ``resample`` (the spurious score ``S``): ``b . x`` replaced by its value on the spurious
  counterfactual at every edit point, i.e. the counterfactual's amount of the direction
  patched in (for a ``resid_pre`` direction, at every residual writer);
- ``resample_causal``: the same from the causal counterfactual (the causal effect ``C``,
  which gives ``selectivity = S / (S + C)``);
- ``mean`` / ``project``: the edit that pruning applies.

``exact=True`` runs one patched forward pass per direction and batch; ``exact=False`` is
attribution patching, the first-order estimate from one forward and backward pass:
``dP ~ sum_points sum_pos (dP/dx . a) (t - b . x)``.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from icp_lens.directions.core import DirectionSet
from icp_lens.directions.intervene import _plan, amounts, direction_hooks
from icp_lens.hooks import hooked
from icp_lens.metrics import Metric, get_metric
from icp_lens.probeset import ProbeSet
from icp_lens.scoring.effects import Effects, counterfactual_tokens

__all__ = ["direction_effects", "DIRECTION_INTERVENTIONS"]

DIRECTION_INTERVENTIONS: tuple[str, ...] = ("resample", "resample_causal", "mean", "project")


def direction_effects(
    model: Any,
    probes: ProbeSet,
    directions: DirectionSet,
    intervention: str = "resample",
    *,
    metric: str | Metric = "logit_diff",
    exact: bool = True,
    batch_size: int = 32,
    progress: bool = False,
) -> Effects:
    """``dP`` for every direction and probe example under ``intervention`` (see the module docstring)."""
    if intervention not in DIRECTION_INTERVENTIONS:
        raise ValueError(f"Unknown direction intervention {intervention!r}; valid: {list(DIRECTION_INTERVENTIONS)}")
    metric_fn = get_metric(metric)
    n = len(probes)
    # the results gather on the CPU (each batch's are moved there), whatever the model's device
    values = torch.full((len(directions), n), float("nan"), dtype=torch.float64, device="cpu")
    clean_p = torch.full((n,), float("nan"), dtype=torch.float64, device="cpu")
    which = {"resample": "spurious", "resample_causal": "causal"}.get(intervention)
    mode = "resample" if which else intervention
    device = next(model.parameters()).device
    singles = [DirectionSet((d,), directions.writers) for d in directions]
    batches = list(probes.batches(batch_size, device=device))
    for batch in tqdm(batches, desc="direction effects", disable=not progress, leave=False):
        other = None
        if which is not None:
            other = getattr(batch, which)
            if other is None:
                continue
            other = counterfactual_tokens(batch, which)
        idx = batch.index.cpu()
        if exact:
            with torch.no_grad():
                clean = model(batch.tokens)[:, -1].float()
            p0 = metric_fn(clean, batch, clean).double().cpu()
            targets = amounts(model, directions, other) if other is not None else None
            for i, single in enumerate(singles):
                t = None if targets is None else {(0, h): v for (k, h), v in targets.items() if k == i}
                with torch.no_grad(), hooked(model, direction_hooks(model, single, mode=mode, targets=t)):
                    logits = model(batch.tokens)[:, -1].float()
                values[i, idx] = metric_fn(logits, batch, clean).double().cpu() - p0
        else:
            p0, est = _attribution(model, batch, directions, mode, other, metric_fn)
            values[:, idx] = est
        clean_p[idx] = p0
    return Effects(
        features=tuple(directions.features),
        intervention=intervention,
        values=values.float(),
        clean=clean_p.float(),
        exact=exact,
        metric=getattr(metric_fn, "__name__", str(metric)),
    )


def _attribution(model: Any, batch: Any, directions: DirectionSet, mode: str, other: Any, metric_fn: Metric):
    plan = _plan(directions, directions.writers)
    targets = amounts(model, directions, other) if other is not None else None
    store: dict[str, torch.Tensor] = {}

    def make(name: str):
        def fn(act: torch.Tensor, hook: Any = None) -> None:
            store[name] = act

        return fn

    with torch.enable_grad(), hooked(model, [(h, make(h)) for h in plan]):
        logits = model(batch.tokens)[:, -1].float()
        p = metric_fn(logits, batch, logits.detach())
        grads = torch.autograd.grad(p.sum(), [store[h] for h in plan])
    est = torch.zeros(len(directions), batch.size, dtype=torch.float64, device="cpu")  # filled from the CPU
    for (hook, items), g in zip(plan.items(), grads, strict=True):
        act = store[hook].detach()
        for i, d, j in items:
            x = act if d.head is None else act[..., d.head, :]
            gx = g if d.head is None else g[..., d.head, :]
            amount = d.amount(x).double()
            if mode == "project":
                target = torch.zeros_like(amount)
            elif mode == "mean":
                target = torch.full_like(amount, float(d.means[j]))
            else:
                target = targets[(i, hook)].double()
            ga = gx.double() @ d.write.to(gx.device).double()
            est[i] += (ga * (target - amount)).sum(-1).cpu()
    return p.detach().double().cpu(), est

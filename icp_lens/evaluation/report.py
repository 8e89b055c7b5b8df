"""The evaluation report: every metric of a model on a probe set, with bootstrap intervals.

``evaluate(model, tokenizer, examples)`` runs the model once on the prompts and once on
each kind of counterfactual (:func:`~icp_lens.evaluation.predictions.predict_examples`)
and scores the predictions with the pure functions of
:mod:`icp_lens.evaluation.metrics`:

==========================  ==================================================  ==========================
metric                      definition                                          needs
==========================  ==================================================  ==========================
accuracy                    mean(choice == answer)                              --
group_accuracy              accuracy within each group                          groups
worst_group_accuracy        min over groups                                     groups
flip_rate                   share of choices the spurious cf changes            spurious counterfactuals
ece                         expected calibration error (10 bins)                --
demographic_parity_diff     max_c gap of P(choice=c) across sensitive values    two sensitive values
equal_opportunity_gap       largest gap of the true-positive rate               two sensitive values
equalized_odds              max(TPR gap, FPR gap)                               two sensitive values
causal_accuracy             accuracy on the causal cf against causal_answer     causal answers
spurious_sensitivity        mean abs change of the margin under spurious cf     spurious counterfactuals
causal_sensitivity          the same under the causal cf                        causal counterfactuals
causal_robustness_ratio     causal / spurious sensitivity                       both
==========================  ==================================================  ==========================

The sensitive attribute of an example is read from its group
(:func:`~icp_lens.evaluation.metrics.sensitive_attribute`: the ``key=value`` parts, or
the one named ``sensitive_key``). Where the data lacks what a metric needs, the metric
is ``None`` and ``report.notes[metric]`` says why. Intervals are percentile bootstraps
over examples (``n_boot`` resamples, seeded; ``n_boot=0`` skips them).

``report.to_dict()`` / ``to_json()`` are the stable, JSON-ready form (the CLI prints
it); ``to_frame()`` is tidy (``metric, value, ci_low, ci_high``); ``compare_reports``
puts several reports side by side (before / after pruning).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from icp_lens.evaluation.metrics import (
    InsufficientDataError,
    accuracy,
    bootstrap_ci,
    causal_robustness_ratio,
    demographic_parity_diff,
    equal_opportunity_gap,
    equalized_odds,
    expected_calibration_error,
    group_accuracy,
    sensitive_attribute,
    sensitivity,
    worst_group_accuracy,
)
from icp_lens.evaluation.predictions import Predictions, predict_examples
from icp_lens.jsonsafe import jsonable
from icp_lens.probes import ProbeExample

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["METRICS", "EvalReport", "evaluate", "evaluate_predictions", "compare_reports"]

#: the scalar metrics of a report, in report order (each may have ``<name>_ci``)
METRICS: tuple[str, ...] = (
    "accuracy",
    "worst_group_accuracy",
    "flip_rate",
    "ece",
    "demographic_parity_diff",
    "equal_opportunity_gap",
    "equalized_odds",
    "causal_accuracy",
    "spurious_sensitivity",
    "causal_sensitivity",
    "causal_robustness_ratio",
)

CI = tuple[float, float]


@dataclass(frozen=True, eq=False)
class EvalReport:
    """Metrics of one model on one probe set (``None`` where the data lacks what one needs).

    One attribute per name in :data:`METRICS`; ``ci[name]`` is its bootstrap interval
    where computed, ``notes[name]`` the reason a metric is ``None``. ``predictions``
    holds the per-example choices the metrics were computed from.
    """

    n: int
    accuracy: float
    worst_group_accuracy: float | None
    flip_rate: float | None
    ece: float
    demographic_parity_diff: float | None
    equal_opportunity_gap: float | None
    equalized_odds: float | None
    causal_accuracy: float | None
    spurious_sensitivity: float | None
    causal_sensitivity: float | None
    causal_robustness_ratio: float | None
    group_accuracy: dict[str, float] | None
    group_size: dict[str, int] | None
    group_accuracy_ci: dict[str, CI] | None
    worst_group: str | None
    n_spurious_cf: int
    n_causal_cf: int
    ci: dict[str, CI] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    sensitive_key: str | None = None
    n_boot: int = 200
    seed: int = 0
    predictions: Predictions | None = field(default=None, repr=False)

    @property
    def values(self) -> dict[str, float | None]:
        """``{metric: value}`` in :data:`METRICS` order."""
        return {name: getattr(self, name) for name in METRICS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``n``, every metric and its ``<metric>_ci`` (``[low, high]`` or ``None``), groups, notes."""
        out: dict[str, Any] = {"n": self.n}
        for name in METRICS:
            out[name] = _clean(getattr(self, name))
            out[f"{name}_ci"] = _clean_ci(self.ci.get(name))
        out["worst_group"] = self.worst_group
        out["group_accuracy"] = None if self.group_accuracy is None else dict(self.group_accuracy)
        out["group_size"] = None if self.group_size is None else dict(self.group_size)
        out["group_accuracy_ci"] = (
            None if self.group_accuracy_ci is None else {g: _clean_ci(c) for g, c in self.group_accuracy_ci.items()}
        )
        out.update(
            n_spurious_cf=self.n_spurious_cf,
            n_causal_cf=self.n_causal_cf,
            sensitive_key=self.sensitive_key,
            n_boot=self.n_boot,
            seed=self.seed,
            notes=dict(self.notes),
        )
        return out

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        """``to_dict()`` as JSON (infinite values become ``null``); written to ``path`` if given."""
        text = json.dumps(jsonable(self.to_dict()), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per metric (``metric, value, ci_low, ci_high``), then ``group_accuracy[<group>]`` rows."""
        return _frame(self.to_dict())


def _clean(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _clean_ci(ci: CI | None) -> list[float | None] | None:
    if ci is None or all(math.isnan(v) for v in ci):
        return None
    return [_clean(ci[0]), _clean(ci[1])]


def _frame(d: Mapping[str, Any]) -> pd.DataFrame:
    import pandas as pd

    def row(metric: str, value: Any, ci: Sequence[float | None] | None) -> dict[str, Any]:
        low, high = (None, None) if ci is None else ci
        return {"metric": metric, "value": value, "ci_low": low, "ci_high": high}

    rows = [row(name, d.get(name), d.get(f"{name}_ci")) for name in METRICS]
    group_ci = d.get("group_accuracy_ci") or {}
    for g, value in (d.get("group_accuracy") or {}).items():
        rows.append(row(f"group_accuracy[{g}]", value, group_ci.get(g)))
    frame = pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])
    frame[["value", "ci_low", "ci_high"]] = frame[["value", "ci_low", "ci_high"]].astype(float)
    return frame


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[ProbeExample],
    *,
    n_boot: int = 200,
    seed: int = 0,
    sensitive_key: str | None = None,
    n_bins: int = 10,
    batch_size: int = 256,
    data_parallel: bool = False,
) -> EvalReport:
    """Run ``model`` on ``examples`` (and their counterfactuals) and report every metric.

    ``data_parallel``: share the forward passes among the ranks of a ``torch.distributed``
    process group (torchrun); every rank gets the one-process report.
    """
    predictions = predict_examples(model, tokenizer, examples, batch_size=batch_size, data_parallel=data_parallel)
    return evaluate_predictions(predictions, n_boot=n_boot, seed=seed, sensitive_key=sensitive_key, n_bins=n_bins)


def evaluate_predictions(
    predictions: Predictions,
    *,
    n_boot: int = 200,
    seed: int = 0,
    sensitive_key: str | None = None,
    n_bins: int = 10,
) -> EvalReport:
    """The report of :func:`evaluate` from predictions already made."""
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0 (0 = no intervals), got {n_boot}")
    p = predictions
    values: dict[str, float | None] = {}
    ci: dict[str, CI] = {}
    notes: dict[str, str] = {}

    def metric(name: str, fn: Callable[..., float | None], *arrays: Any, per_example: Any = None) -> None:
        """Compute ``fn(*arrays)``; ``None`` + note if the data lacks what it needs; bootstrap it."""
        try:
            values[name] = fn(*arrays)
        except InsufficientDataError as err:
            values[name], notes[name] = None, str(err)
            return
        if n_boot > 0:
            if per_example is not None:  # a mean over examples: the fast bootstrap
                ci[name] = bootstrap_ci(per_example, n_boot=n_boot, seed=seed)
            else:
                ci[name] = bootstrap_ci(*arrays, statistic=fn, n_boot=n_boot, seed=seed)

    def missing(name: str, why: str) -> None:
        values[name], notes[name] = None, why

    correct = p.correct.astype(float)
    metric("accuracy", accuracy, p.choice, p.answer, per_example=correct)

    grouped = np.array([g is not None for g in p.group])
    group_acc = group_size = group_ci = worst = None
    if grouped.any():
        choice, answer, groups = p.choice[grouped], p.answer[grouped], p.group[grouped]
        group_acc = group_accuracy(choice, answer, groups)
        group_size = {g: int((groups == g).sum()) for g in group_acc}
        worst = min(group_acc, key=lambda g: (group_acc[g], g))
        metric("worst_group_accuracy", worst_group_accuracy, choice, answer, groups)
        if n_boot > 0:
            group_ci = _group_cis(correct, p.group, list(group_acc), n_boot, seed)
    else:
        missing("worst_group_accuracy", "no example has a group")

    flips = np.array([np.nan if f is None else float(f) for f in p.flipped])
    metric("flip_rate", _flip_rate, flips, per_example=flips)
    metric("ece", lambda c, k: expected_calibration_error(c, k, n_bins), p.confidence, correct)

    if grouped.any():
        sensitive = np.array([sensitive_attribute(g, sensitive_key) for g in groups], dtype=object)
        metric("demographic_parity_diff", demographic_parity_diff, choice, sensitive)
        metric("equal_opportunity_gap", equal_opportunity_gap, choice, answer, sensitive)
        metric("equalized_odds", equalized_odds, choice, answer, sensitive)
    else:
        for name in ("demographic_parity_diff", "equal_opportunity_gap", "equalized_odds"):
            missing(name, "no example has a group, so there is no sensitive attribute")

    causal_hit = np.array([np.nan if c is None else float(c) for c in p.correct_causal_cf])
    metric("causal_accuracy", _causal_accuracy, causal_hit, per_example=causal_hit)
    for name, margin_cf in (("spurious", p.margin_spurious_cf), ("causal", p.margin_causal_cf)):
        metric(f"{name}_sensitivity", sensitivity, p.margin, margin_cf, per_example=np.abs(margin_cf - p.margin))
    if values["spurious_sensitivity"] is None or values["causal_sensitivity"] is None:
        missing("causal_robustness_ratio", "needs both spurious and causal counterfactuals")
    else:
        metric("causal_robustness_ratio", _ratio, p.margin, p.margin_spurious_cf, p.margin_causal_cf)
        if values["causal_robustness_ratio"] in (None, math.inf):
            notes["causal_robustness_ratio"] = "the spurious counterfactuals never move the margin"

    return EvalReport(
        n=len(p),
        **values,  # type: ignore[arg-type]
        ci=ci,
        group_accuracy=group_acc,
        group_size=group_size,
        group_accuracy_ci=group_ci,
        worst_group=worst,
        n_spurious_cf=sum(ex.spurious_counterfactual is not None for ex in p.examples),
        n_causal_cf=sum(ex.causal_counterfactual is not None for ex in p.examples),
        notes=notes,
        sensitive_key=sensitive_key,
        n_boot=n_boot,
        seed=seed,
        predictions=p,
    )


def _flip_rate(flips: np.ndarray) -> float:
    if np.isnan(flips).all():
        raise InsufficientDataError("no example has a spurious_counterfactual")
    return float(np.nanmean(flips))


def _causal_accuracy(hits: np.ndarray) -> float:
    if np.isnan(hits).all():
        raise InsufficientDataError("no example has a causal_counterfactual with a causal_answer")
    return float(np.nanmean(hits))


def _ratio(margin: np.ndarray, margin_spurious: np.ndarray, margin_causal: np.ndarray) -> float | None:
    return causal_robustness_ratio(sensitivity(margin, margin_causal), sensitivity(margin, margin_spurious))


def _group_cis(correct: np.ndarray, groups: np.ndarray, names: list[str], n_boot: int, seed: int) -> dict[str, CI]:
    """Bootstrap intervals of every group's accuracy at once (resampling all examples)."""
    import torch

    from icp_lens.scoring.spuriousness import bootstrap_ci as mean_ci

    rows = np.stack([np.where(groups == g, correct, np.nan) for g in names])
    low, high = mean_ci(torch.tensor(rows, dtype=torch.float64, device="cpu"), n_boot=n_boot, seed=seed)
    return {g: (float(lo), float(hi)) for g, lo, hi in zip(names, low, high, strict=True)}


def compare_reports(reports: Mapping[str, EvalReport | Mapping[str, Any]]) -> pd.DataFrame:
    """Reports side by side: one row per metric, one column per name (e.g. before / after).

    Each report is an :class:`EvalReport` or its ``to_dict()`` (e.g. a saved JSON read
    back). Group rows are the union over reports (NaN where a report lacks the group).
    """
    import pandas as pd

    if not reports:
        raise ValueError("compare_reports needs at least one report, e.g. {'before': r1, 'after': r2}")
    columns = []
    for name, report in reports.items():
        if isinstance(report, EvalReport):
            frame = report.to_frame()
        elif isinstance(report, Mapping):
            frame = _frame(report)
        else:
            raise TypeError(f"report {name!r} is a {type(report).__name__}; expected an EvalReport or its to_dict()")
        columns.append(frame.set_index("metric")["value"].rename(name))
    out = pd.concat(columns, axis=1, sort=False)
    out.index.name = "metric"
    return out

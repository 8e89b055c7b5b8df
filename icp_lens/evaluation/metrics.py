"""Evaluation metrics: pure functions on per-example arrays, one number out.

A model is evaluated on probe examples (:mod:`icp_lens.probes`) by its *choice*: the
argmax of the next-token logits restricted to the example's ``answer`` and
``alternatives``. Everything here starts from per-example arrays (choices, gold
answers, groups, confidences, margins) and returns one number, so the same functions
score a model, a pruned model or a baseline's predictions read from a file.

Accuracy and groups
    ``accuracy = mean(pred == gold)``; ``group_accuracy[g]`` is the accuracy on the
    examples of group ``g``; ``worst_group_accuracy = min_g group_accuracy[g]``: the
    number a spurious shortcut hurts most (the group where shortcut and label disagree).

Sensitive attribute and fairness gaps
    A group string is ``|``-separated: the organisms' ``"pos|shortcut=neg"`` is the
    label ``pos`` and the attribute ``shortcut=neg``. :func:`sensitive_attribute` keeps
    the ``key=value`` parts (the label is not sensitive); a group with no such part is
    itself the sensitive attribute. With ``P_s`` the probability within sensitive
    value ``s``:

    - ``demographic_parity_diff = max_c (max_s P_s(pred=c) - min_s P_s(pred=c))``;
    - ``equal_opportunity_gap``: the gap ``max_s - min_s`` of the true-positive rate
      ``P_s(pred=c | gold=c)`` for the positive class ``c`` (default: the largest over
      classes);
    - ``equalized_odds``: the larger of that gap and the false-positive-rate gap
      ``P_s(pred=c | gold != c)``.

    Zero means the prediction does not depend on the sensitive attribute.

Calibration
    ``expected_calibration_error = sum_b (n_b / n) |acc_b - conf_b|`` over equal-width
    confidence bins (Guo et al. 2017); the confidence is the softmax probability of the
    choice with the softmax restricted to the candidate tokens.

Robustness
    ``flip_rate``: the share of examples whose choice changes when only the spurious
    attribute changes (the spurious counterfactual). ``robustness_score = balanced /
    in-distribution accuracy``. ``sensitivity = mean |margin(x_cf) - margin(x)|`` with
    ``margin = logit(answer) - max logit(alternatives)`` of the *original* answer;
    ``causal_robustness_ratio = causal / spurious sensitivity`` (> 1: the true cause
    moves the model more than the shortcut). ``gap_closed = (method - original) /
    (oracle - original)``: the share of the worst-group gap a mitigation closes.

Bias in sentence pairs
    ``pair_bias_score``: CrowS-Pairs (Nangia et al. 2020): the share of pairs where the
    more stereotypical sentence gets the higher log-likelihood; 0.5 is unbiased.

Conventions: arrays must be non-empty and of equal length (``ValueError`` otherwise);
``None`` (or NaN) marks a missing entry (an example without a group or a
counterfactual), left out of the metrics that need it. When the data lacks what a
metric needs (fewer than two sensitive values, no counterfactual at all) the error is
an :class:`InsufficientDataError`, a ``ValueError`` the report turns into ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "InsufficientDataError",
    "accuracy",
    "group_accuracy",
    "worst_group_accuracy",
    "sensitive_attribute",
    "demographic_parity_diff",
    "equal_opportunity_gap",
    "equalized_odds",
    "expected_calibration_error",
    "flip_rate",
    "sensitivity",
    "robustness_score",
    "causal_robustness_ratio",
    "pair_bias_score",
    "bootstrap_ci",
    "gap_closed",
]


class InsufficientDataError(ValueError):
    """The data lacks what a metric needs (e.g. one sensitive value, no counterfactual)."""


def _array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one entry per example), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: a metric needs at least one example")
    return arr


def _arrays(**named: Any) -> list[np.ndarray]:
    arrays = [_array(v, k) for k, v in named.items()]
    lengths = {k: len(a) for k, a in zip(named, arrays, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have one entry per example, got lengths {lengths}")
    return arrays


def _present(arr: np.ndarray) -> np.ndarray:
    """True where an entry is given (not ``None``, not NaN)."""
    return np.array([not (v is None or (isinstance(v, float) and math.isnan(v))) for v in arr], dtype=bool)


def _values(arr: np.ndarray) -> list[Hashable]:
    """Distinct entries in a stable order."""
    return sorted(set(arr.tolist()), key=lambda v: (str(type(v)), str(v)))


def _floats(values: Any, name: str) -> np.ndarray:
    """A float array; ``None`` entries become NaN."""
    arr = _array(values, name)
    if arr.dtype == object:
        arr = np.array([np.nan if v is None else v for v in arr], dtype=float)
    return arr.astype(float)


def accuracy(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    """``mean(pred == gold)``: the share of examples whose choice is the answer."""
    p, g = _arrays(pred=pred, gold=gold)
    return float(np.mean(p == g))


def group_accuracy(
    pred: Sequence[Hashable], gold: Sequence[Hashable], groups: Sequence[str | None]
) -> dict[str, float]:
    """Accuracy within each group, ``{group: accuracy}`` sorted by group.

    Examples whose group is ``None`` are left out; :class:`InsufficientDataError` if
    no example has a group.
    """
    p, g, grp = _arrays(pred=pred, gold=gold, groups=groups)
    keep = _present(grp)
    if not keep.any():
        raise InsufficientDataError("no example has a group")
    p, g, grp = p[keep], g[keep], grp[keep]
    return {str(v): float(np.mean(p[grp == v] == g[grp == v])) for v in _values(grp)}


def worst_group_accuracy(pred: Sequence[Hashable], gold: Sequence[Hashable], groups: Sequence[str | None]) -> float:
    """``min_g group_accuracy[g]``: the accuracy of the group the model serves worst."""
    return min(group_accuracy(pred, gold, groups).values())


def sensitive_attribute(group: str, key: str | None = None) -> str:
    """The sensitive part of a group string.

    A group string is ``|``-separated; parts of the form ``key=value`` are attributes,
    other parts (the label) are not sensitive. The sensitive attribute is

    - with ``key``: the one part ``key=value`` (``ValueError`` naming the keys there
      are if the group has none with that key);
    - without: all ``key=value`` parts joined with ``|`` in their order;
    - a group without any ``key=value`` part is itself the sensitive attribute.

    >>> sensitive_attribute("pos|shortcut=neg")
    'shortcut=neg'
    >>> sensitive_attribute("female-stereotyped")
    'female-stereotyped'
    """
    if not isinstance(group, str):
        raise ValueError(f"a group must be a string, got {type(group).__name__} {group!r}")
    parts = [part.strip() for part in group.split("|")]
    attributes = [part for part in parts if "=" in part]
    if key is not None:
        found = [part for part in attributes if part.split("=", 1)[0].strip() == key]
        if not found:
            keys = [part.split("=", 1)[0].strip() for part in attributes]
            raise ValueError(f"group {group!r} has no attribute {key!r}; its attribute keys: {keys}")
        return found[0]
    return "|".join(attributes) if attributes else group


def _sensitive_masks(sensitive: np.ndarray, keep: np.ndarray, need: str) -> list[np.ndarray]:
    present = keep & _present(sensitive)
    values = _values(sensitive[present])
    if len(values) < 2:
        raise InsufficientDataError(f"{need} needs at least two sensitive values, got {values}")
    return [present & (sensitive == v) for v in values]


def demographic_parity_diff(pred: Sequence[Hashable], sensitive: Sequence[Hashable | None]) -> float:
    """``max_c (max_s P(pred=c | s) - min_s P(pred=c | s))`` over predicted classes ``c``.

    0: every sensitive value receives each prediction equally often. Examples whose
    sensitive value is ``None`` are left out.
    """
    p, s = _arrays(pred=pred, sensitive=sensitive)
    masks = _sensitive_masks(s, np.ones(len(p), dtype=bool), "demographic parity")
    kept = np.logical_or.reduce(masks)
    gap = 0.0
    for c in _values(p[kept]):
        rates = [np.mean(p[m] == c) for m in masks]
        gap = max(gap, float(max(rates) - min(rates)))
    return gap


def _rate_gaps(
    pred: Sequence[Hashable], gold: Sequence[Hashable], sensitive: Sequence[Hashable | None], positive: Hashable | None
) -> tuple[dict[Hashable, float], dict[Hashable, float]]:
    """TPR and FPR gaps across sensitive values, per class where defined."""
    p, g, s = _arrays(pred=pred, gold=gold, sensitive=sensitive)
    classes = _values(g)
    if positive is not None:
        if positive not in classes:
            raise ValueError(f"positive class {positive!r} is not among the gold labels {classes}")
        classes = [positive]
    present = _present(s)
    tpr_gaps: dict[Hashable, float] = {}
    fpr_gaps: dict[Hashable, float] = {}
    for c in classes:
        for gaps, cond in ((tpr_gaps, g == c), (fpr_gaps, g != c)):
            rates = [np.mean(p[cond & present & (s == v)] == c) for v in _values(s[cond & present])]
            if len(rates) >= 2:
                gaps[c] = float(max(rates) - min(rates))
    return tpr_gaps, fpr_gaps


def equal_opportunity_gap(
    pred: Sequence[Hashable],
    gold: Sequence[Hashable],
    sensitive: Sequence[Hashable | None],
    positive: Hashable | None = None,
) -> float:
    """The gap ``max_s - min_s`` of the true-positive rate ``P(pred=c | gold=c, s)``.

    ``c`` is ``positive``; by default every gold class in turn, and the largest gap is
    returned. A class counts where at least two sensitive values have examples of it.
    """
    tpr, _ = _rate_gaps(pred, gold, sensitive, positive)
    if not tpr:
        raise InsufficientDataError("equal opportunity needs a gold class with examples in two sensitive values")
    return max(tpr.values())


def equalized_odds(
    pred: Sequence[Hashable],
    gold: Sequence[Hashable],
    sensitive: Sequence[Hashable | None],
    positive: Hashable | None = None,
) -> float:
    """``max(TPR gap, FPR gap)`` across sensitive values (Hardt et al. 2016).

    The false-positive rate of class ``c`` is ``P(pred=c | gold != c, s)``. Without
    ``positive`` the largest gap over classes is returned.
    """
    tpr, fpr = _rate_gaps(pred, gold, sensitive, positive)
    gaps = list(tpr.values()) + list(fpr.values())
    if not gaps:
        raise InsufficientDataError("equalized odds needs examples of a class in two sensitive values")
    return max(gaps)


def expected_calibration_error(probs: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """``sum_b (n_b / n) |acc_b - conf_b|`` over ``n_bins`` equal-width confidence bins.

    ``probs`` is the confidence of each choice (its probability, the softmax taken over
    the answer and alternatives only); ``correct`` whether the choice is the answer.
    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (0 goes to the
    first bin); ``acc_b`` and ``conf_b`` are the mean correctness and confidence there.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = _floats(probs, "probs")
    hit = _floats(correct, "correct")
    if np.isnan(hit).any():
        raise ValueError("correct must be given (True/False) for every example")
    if len(conf) != len(hit):
        raise ValueError(f"probs and correct must have one entry per example, got {len(conf)} and {len(hit)}")
    if np.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        raise ValueError("probs must be probabilities in [0, 1]")
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        m = bins == b
        ece += m.mean() * abs(hit[m].mean() - conf[m].mean())
    return float(ece)


def flip_rate(pred: Sequence[Hashable], pred_cf: Sequence[Hashable | None]) -> float:
    """Share of examples whose choice changes under the spurious counterfactual.

    ``pred_cf[i]`` is the choice on example ``i``'s counterfactual, ``None`` where it
    has none; only examples with one count.
    """
    p, q = _arrays(pred=pred, pred_cf=pred_cf)
    has = _present(q)
    if not has.any():
        raise InsufficientDataError("no example has a counterfactual")
    return float(np.mean(p[has] != q[has]))


def sensitivity(margin: Sequence[float], margin_cf: Sequence[float]) -> float:
    """``mean |margin_cf - margin|`` over examples with a counterfactual (NaN = none).

    ``margin = logit(answer) - max logit(alternatives)``, on the counterfactual measured
    with the *original* answer and alternatives: how far the counterfactual moves the
    model's preference.
    """
    m, mc = _floats(margin, "margin"), _floats(margin_cf, "margin_cf")
    if len(m) != len(mc):
        raise ValueError(f"margin and margin_cf must have one entry per example, got {len(m)} and {len(mc)}")
    has = ~np.isnan(mc)
    if not has.any():
        raise InsufficientDataError("no example has a counterfactual")
    return float(np.mean(np.abs(mc[has] - m[has])))


def robustness_score(balanced_acc: float, id_acc: float) -> float | None:
    """``balanced_acc / id_acc``: the share of in-distribution accuracy that survives
    when the shortcut stops predicting the label (1 = robust). ``None`` if ``id_acc == 0``."""
    for name, v in (("balanced_acc", balanced_acc), ("id_acc", id_acc)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be an accuracy in [0, 1], got {v}")
    return None if id_acc == 0 else balanced_acc / id_acc


def causal_robustness_ratio(causal_sensitivity: float, spurious_sensitivity: float) -> float | None:
    """``causal_sensitivity / spurious_sensitivity`` (see :func:`sensitivity`).

    Above 1 the true cause moves the model more than the spurious attribute does.
    ``inf`` when only the cause moves it, ``None`` when neither does.
    """
    if causal_sensitivity < 0 or spurious_sensitivity < 0:
        raise ValueError(f"sensitivities are non-negative, got {causal_sensitivity} and {spurious_sensitivity}")
    if spurious_sensitivity == 0:
        return None if causal_sensitivity == 0 else math.inf
    return causal_sensitivity / spurious_sensitivity


def pair_bias_score(loglik_more: Sequence[float], loglik_less: Sequence[float]) -> float:
    """CrowS-Pairs score: share of pairs where the more stereotypical sentence is likelier.

    ``loglik_more[i]`` and ``loglik_less[i]`` are the log-likelihoods of pair ``i``'s
    more and less stereotypical sentence. A tie counts one half, so a model that cannot
    tell them apart scores 0.5; above 0.5 it prefers the stereotype.
    """
    more, less = _floats(loglik_more, "loglik_more"), _floats(loglik_less, "loglik_less")
    if len(more) != len(less):
        raise ValueError(f"loglik_more and loglik_less must pair up, got {len(more)} and {len(less)}")
    if np.isnan(more).any() or np.isnan(less).any():
        raise ValueError("log-likelihoods must not be NaN")
    return float(np.mean((more > less) + 0.5 * (more == less)))


def gap_closed(method: float, original: float, oracle: float) -> float | None:
    """``(method - original) / (oracle - original)``: share of the gap a method closes.

    Applied to worst-group accuracy: 0 = no better than the original model, 1 = as good
    as the oracle (trained without the shortcut), negative = worse than doing nothing.
    ``None`` when ``oracle == original`` (there is no gap to close).
    """
    if oracle == original:
        return None
    return (method - original) / (oracle - original)


def _resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` indices drawn as :func:`icp_lens.scoring.spuriousness.bootstrap_ci` draws them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(n, (n_boot, n), generator=generator, device="cpu").numpy()


def bootstrap_ci(
    *arrays: Any,
    statistic: Callable[..., float | None] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` at level ``1 - alpha``, over examples.

    - ``bootstrap_ci(values)``: the interval of the mean of ``values`` (NaN entries
      are missing and left out), computed by
      :func:`icp_lens.scoring.spuriousness.bootstrap_ci`;
    - ``bootstrap_ci(a, b, ..., statistic=f)``: the interval of ``f(a, b, ...)``;
      the arrays are per-example and resampled together (the same rows of each).
      Resamples on which ``f`` is undefined (it returns ``None``/NaN or raises
      ``ValueError``, e.g. a resample drew one sensitive value) are left out.
      Infinite values are kept, not left out: ``+inf`` (e.g.
      :func:`causal_robustness_ratio` on a resample whose spurious sensitivity is 0)
      ranks above every finite value and ``-inf`` below. Each endpoint is the usual
      linear-interpolation percentile of the ranked resamples; where it falls between
      a finite and an infinite resample it is the infinity (the limit of the
      interpolation), and between ``-inf`` and ``+inf`` the nearer one (the lower on
      a tie). So the interval is ``(inf, inf)`` when every resample is ``+inf``, and
      ``(low, inf)`` when more than about ``alpha / 2`` of them are. No numpy
      warning is raised.

    Seeded: the same ``seed`` gives the same interval, and both forms draw the same
    resamples, so ``statistic=np.nanmean`` matches the first form.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one per-example array")
    if statistic is None:
        if len(arrays) != 1:
            raise ValueError(f"without a statistic, bootstrap_ci takes one array of values, got {len(arrays)}")
        import torch

        from icp_lens.scoring.spuriousness import bootstrap_ci as _mean_ci

        values = _floats(arrays[0], "values")
        low, high = _mean_ci(torch.tensor(values, device="cpu")[None, :], n_boot=n_boot, level=1 - alpha, seed=seed)
        return float(low[0]), float(high[0])
    data = _arrays(**{f"array {i}": a for i, a in enumerate(arrays)})
    stats = np.full(n_boot, np.nan)
    for b, idx in enumerate(_resample_indices(len(data[0]), n_boot, seed)):
        try:
            value = statistic(*(a[idx] for a in data))
        except ValueError:
            continue
        stats[b] = np.nan if value is None else float(value)
    if np.isnan(stats).all():
        return math.nan, math.nan
    low, high = _percentiles(stats[~np.isnan(stats)], (alpha / 2, 1 - alpha / 2))
    return low, high


def _percentiles(values: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation percentiles of non-NaN ``values``, which may hold +-inf (see bootstrap_ci)."""
    if np.isfinite(values).all():
        return [float(v) for v in np.quantile(values, qs)]
    ranked = np.sort(values)
    out: list[float] = []
    for q in qs:
        pos = q * (len(ranked) - 1)
        lo = int(math.floor(pos))
        hi, t = min(lo + 1, len(ranked) - 1), pos - lo
        a, b = float(ranked[lo]), float(ranked[hi])
        if t == 0 or a == b:
            out.append(a)
        elif math.isfinite(a) and math.isfinite(b):
            out.append(a + (b - a) * t)
        elif math.isinf(a) and math.isinf(b):  # -inf below, +inf above
            out.append(a if t <= 0.5 else b)
        else:
            out.append(a if math.isinf(a) else b)
    return out

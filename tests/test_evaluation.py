"""Evaluation metrics: each one against numbers computed by hand on a few examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from icp_lens.evaluation import (
    InsufficientDataError,
    accuracy,
    bootstrap_ci,
    causal_robustness_ratio,
    demographic_parity_diff,
    equal_opportunity_gap,
    equalized_odds,
    expected_calibration_error,
    flip_rate,
    gap_closed,
    group_accuracy,
    group_gap,
    pair_bias_score,
    robustness_score,
    sensitive_attribute,
    sensitivity,
    worst_group_accuracy,
)
from icp_lens.evaluation.metrics import _resample_indices

# i  gold  pred  group      sensitive
# 0  pos   pos   pos|s=A    s=A
# 1  pos   pos   pos|s=A    s=A
# 2  pos   neg   pos|s=B    s=B
# 3  pos   pos   pos|s=B    s=B
# 4  neg   neg   neg|s=A    s=A
# 5  neg   pos   neg|s=A    s=A
# 6  neg   neg   neg|s=B    s=B
# 7  neg   pos   neg|s=B    s=B
GOLD = ["pos"] * 4 + ["neg"] * 4
PRED = ["pos", "pos", "neg", "pos", "neg", "pos", "neg", "pos"]
GROUPS = ["pos|s=A", "pos|s=A", "pos|s=B", "pos|s=B", "neg|s=A", "neg|s=A", "neg|s=B", "neg|s=B"]
SENSITIVE = [sensitive_attribute(g) for g in GROUPS]


def test_accuracy_and_groups():
    assert accuracy(PRED, GOLD) == 5 / 8  # wrong: 2, 5, 7
    # pos|A: 0,1 right; pos|B: 3 of 2,3; neg|A: 4 of 4,5; neg|B: 6 of 6,7
    assert group_accuracy(PRED, GOLD, GROUPS) == {"neg|s=A": 0.5, "neg|s=B": 0.5, "pos|s=A": 1.0, "pos|s=B": 0.5}
    assert worst_group_accuracy(PRED, GOLD, GROUPS) == 0.5
    # examples without a group are left out of the group metrics
    assert group_accuracy(["a", "b", "a"], ["a", "a", "a"], ["g", None, "g"]) == {"g": 1.0}
    with pytest.raises(InsufficientDataError, match="no example has a group"):
        group_accuracy(["a"], ["a"], [None])


def test_sensitive_attribute():
    assert sensitive_attribute("pos|shortcut=neg") == "shortcut=neg"
    assert sensitive_attribute("a=1|label|b=2") == "a=1|b=2"
    assert sensitive_attribute("a=1|label|b=2", key="b") == "b=2"
    assert sensitive_attribute("female-stereotyped") == "female-stereotyped"
    with pytest.raises(ValueError, match=r"no attribute 'c'.*\['a', 'b'\]"):
        sensitive_attribute("a=1|label|b=2", key="c")
    assert SENSITIVE == ["s=A", "s=A", "s=B", "s=B", "s=A", "s=A", "s=B", "s=B"]


def test_demographic_parity():
    # P(pred=pos | A) = 3/4 (0, 1, 5), P(pred=pos | B) = 2/4 (3, 7): gap 1/4; the same for neg
    assert demographic_parity_diff(PRED, SENSITIVE) == pytest.approx(0.25)
    assert demographic_parity_diff(["x", "x", "y", "y"], ["a", "a", "b", "b"]) == 1.0
    with pytest.raises(InsufficientDataError, match="two sensitive values"):
        demographic_parity_diff(PRED, ["s=A"] * 8)
    with pytest.raises(InsufficientDataError):  # None = no sensitive value: one value left
        demographic_parity_diff(["x", "y"], ["a", None])


def test_equal_opportunity_and_equalized_odds():
    # TPR(pos): A 2/2 (0, 1), B 1/2 (3 of 2, 3) -> gap 0.5; TPR(neg): A 1/2, B 1/2 -> gap 0
    assert equal_opportunity_gap(PRED, GOLD, SENSITIVE, positive="pos") == 0.5
    assert equal_opportunity_gap(PRED, GOLD, SENSITIVE, positive="neg") == 0.0
    assert equal_opportunity_gap(PRED, GOLD, SENSITIVE) == 0.5  # max over classes
    # FPR(neg) = P(pred=neg | gold=pos): A 0/2, B 1/2 -> 0.5, so equalized odds sees what EO misses
    assert equalized_odds(PRED, GOLD, SENSITIVE, positive="neg") == 0.5
    # FPR(pos) = P(pred=pos | gold=neg): A 1/2, B 1/2 -> 0; TPR gap 0.5
    assert equalized_odds(PRED, GOLD, SENSITIVE, positive="pos") == 0.5
    with pytest.raises(ValueError, match=r"positive class 'maybe' is not among the gold labels \['neg', 'pos'\]"):
        equal_opportunity_gap(PRED, GOLD, SENSITIVE, positive="maybe")
    # class pos only in A: no TPR comparison possible
    with pytest.raises(InsufficientDataError):
        equal_opportunity_gap(["pos", "neg"], ["pos", "neg"], ["A", "B"], positive="pos")


def test_expected_calibration_error():
    probs, correct = [0.95, 0.85, 0.65, 0.55], [True, False, True, True]
    # 10 bins, one example each: (|1-.95| + |0-.85| + |1-.65| + |1-.55|) / 4 = 1.7 / 4
    assert expected_calibration_error(probs, correct) == pytest.approx(0.425)
    # 2 bins: all in (0.5, 1]: accuracy 3/4, mean confidence 3.0/4 -> 0
    assert expected_calibration_error(probs, correct, n_bins=2) == pytest.approx(0.0)
    # bins are (lo, hi]: 0.5 lands in the first of 2 bins, 1.0 in the last
    # bin 1: conf 0.5, acc 0 -> 0.5 * 0.5; bin 2: conf 1.0, acc 1 -> 0
    assert expected_calibration_error([0.5, 1.0], [False, True], n_bins=2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError, match="every example"):
        expected_calibration_error([0.9, 0.8], [True, None])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(probs, correct, n_bins=0)


def test_flip_rate_and_sensitivity():
    # counterfactuals for 0, 1, 3; the choice changes on 1 and 3
    assert flip_rate(["a", "a", "b", "b"], ["a", "b", None, "a"]) == pytest.approx(2 / 3)
    with pytest.raises(InsufficientDataError, match="counterfactual"):
        flip_rate(["a", "b"], [None, None])
    # |0.5 - 1| and |-1 - 2| (example 1 has no counterfactual): (0.5 + 3) / 2
    assert sensitivity([1.0, -1.0, 2.0], [0.5, math.nan, -1.0]) == pytest.approx(1.75)
    assert sensitivity([1.0, -1.0, 2.0], [0.5, None, -1.0]) == pytest.approx(1.75)  # None = missing too
    with pytest.raises(InsufficientDataError):
        sensitivity([1.0], [math.nan])


def test_ratios_and_scores():
    assert robustness_score(0.6, 0.8) == pytest.approx(0.75)
    assert robustness_score(0.5, 0.0) is None
    with pytest.raises(ValueError, match="accuracy"):
        robustness_score(60, 80)
    assert causal_robustness_ratio(3.0, 1.5) == 2.0
    assert causal_robustness_ratio(1.0, 0.0) == math.inf
    assert causal_robustness_ratio(0.0, 0.0) is None
    # pairs: more wins, less wins, tie (1/2), more wins -> 2.5 / 4
    assert pair_bias_score([-1, -2, -3, -4], [-2, -1, -3, -5]) == 0.625
    assert gap_closed(0.6, 0.2, 0.7) == pytest.approx(0.8)
    assert gap_closed(0.1, 0.2, 0.7) == pytest.approx(-0.2)
    assert gap_closed(0.6, 0.5, 0.5) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: accuracy([], []),
        lambda: group_accuracy([], [], []),
        lambda: demographic_parity_diff([], []),
        lambda: equalized_odds([], [], []),
        lambda: expected_calibration_error([], []),
        lambda: flip_rate([], []),
        lambda: sensitivity([], []),
        lambda: pair_bias_score([], []),
        lambda: bootstrap_ci([]),
    ],
)
def test_empty_input_raises(call):
    with pytest.raises(ValueError, match="empty"):
        call()


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match=r"one entry per example.*'pred': 2, 'gold': 3"):
        accuracy(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="pair up"):
        pair_bias_score([1.0], [1.0, 2.0])


def test_bootstrap_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(0)
    values = rng.random(50)
    low, high = bootstrap_ci(values, n_boot=300, seed=1)
    assert low <= values.mean() <= high
    assert (low, high) == bootstrap_ci(values, n_boot=300, seed=1)
    assert (low, high) != bootstrap_ci(values, n_boot=300, seed=2)
    # both forms draw the same resamples, so a mean statistic gives the same interval
    assert bootstrap_ci(values, statistic=np.nanmean, n_boot=300, seed=1) == pytest.approx((low, high), abs=1e-6)
    # a statistic over several per-example arrays, resampled together
    pred = np.array(PRED * 4, dtype=object)
    gold = np.array(GOLD * 4, dtype=object)
    sens = np.array(SENSITIVE * 4, dtype=object)
    low, high = bootstrap_ci(pred, sens, statistic=demographic_parity_diff, n_boot=100, seed=0)
    assert low <= demographic_parity_diff(pred, sens) <= high
    low, high = bootstrap_ci(pred, gold, statistic=accuracy, n_boot=100, seed=0)
    assert low <= 5 / 8 <= high < 1
    # missing entries (NaN) are left out of the mean
    assert bootstrap_ci([1.0, math.nan, 1.0], n_boot=20) == (1.0, 1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(values, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(values, alpha=1.5)
    with pytest.raises(ValueError, match="one array"):
        bootstrap_ci(values, values)


def test_bootstrap_skips_undefined_resamples():
    # with two examples, some resamples draw one sensitive value: DP is undefined there
    low, high = bootstrap_ci(["x", "y"], ["a", "b"], statistic=demographic_parity_diff, n_boot=50, seed=0)
    assert (low, high) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0], statistic=lambda v: None, n_boot=5))


def test_bootstrap_handles_infinite_statistics_without_warnings():
    import warnings

    margin = np.array([1.0, 2.0, 3.0, 4.0])
    still = margin.copy()  # the spurious counterfactuals never move the margin: the ratio is inf
    moved = margin - np.array([0.5, 1.0, 0.0, 2.0])

    def ratio(m, spur, cause):
        return causal_robustness_ratio(sensitivity(m, cause), sensitivity(m, spur))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap_ci(margin, still, moved, statistic=ratio, n_boot=50, seed=0) == (math.inf, math.inf)
        # some resamples infinite (one example in four moves the spurious margin), some finite
        spur = margin - np.array([0.0, 0.0, 0.0, 1.0])
        low, high = bootstrap_ci(margin, spur, moved, statistic=ratio, n_boot=200, seed=0)
        assert math.isfinite(low) and high == math.inf
        # -inf and +inf resamples: the endpoints are the infinities, never NaN
        assert bootstrap_ci([1.0, -1.0], statistic=lambda v: math.inf * v[0], n_boot=50, seed=0) == (
            -math.inf,
            math.inf,
        )
    # finite statistics keep numpy's linear-interpolation percentile
    values = np.random.default_rng(0).random(30)
    expected = np.quantile([np.mean(values[i]) for i in _resample_indices(30, 40, 0)], [0.025, 0.975])
    assert bootstrap_ci(values, statistic=np.mean, n_boot=40, seed=0) == pytest.approx(tuple(expected))


def test_group_gap_by_hand() -> None:
    import torch

    from icp_lens.probes import ProbeExample

    values = [2.0, 1.0, -0.5, 0.5, 3.0, 9.9]  # "a": 2, 1, 3 -> 2.0; "b": -0.5, 0.5 -> 0.0; "c" ignored
    groups = ["a", "a", "b", "b", "a", "c"]
    g = group_gap(values, groups, "a", "b")
    assert (g.gap, g.high_mean, g.low_mean, g.n_high, g.n_low) == (pytest.approx(2.0), 2.0, 0.0, 3, 2)
    assert float(group_gap(values, groups, "b", "a")) == pytest.approx(-2.0)
    examples = [
        ProbeExample(prompt=f"p{i}", answer=" x", alternatives=(" y",), group=grp) for i, grp in enumerate(groups)
    ]
    from_tensor = group_gap(torch.tensor(values, dtype=torch.bfloat16), examples, "a", "b")
    assert from_tensor.gap == pytest.approx(2.0, abs=0.05)  # bf16 inputs, fp32 means
    with pytest.raises(ValueError, match="both groups 'a' and 'z'.*'a', 'b', 'c'"):
        group_gap(values, groups, "a", "z")
    with pytest.raises(ValueError, match="6 values but 5 groups"):
        group_gap(values, groups[:5], "a", "b")
    with pytest.raises(ValueError, match="must differ"):
        group_gap(values, groups, "a", "a")

"""Evaluation: how well a model answers probe examples, and how much a shortcut drives it.

``evaluate(model, tokenizer, examples)`` runs the model on the prompts and their
counterfactuals and returns an :class:`EvalReport` (accuracy, worst-group accuracy,
flip rate under the spurious counterfactual, calibration, fairness gaps across the
sensitive attribute, causal vs spurious sensitivity; bootstrap intervals)::

    from icp_lens.evaluation import compare_reports, evaluate

    before = evaluate(model, tokenizer, probes)
    after = evaluate(pruned, tokenizer, probes)
    compare_reports({"before": before, "after": after})

The metrics themselves are pure functions on per-example arrays
(:mod:`icp_lens.evaluation.metrics`); :mod:`~icp_lens.evaluation.predictions` makes
those arrays from a model; :mod:`~icp_lens.evaluation.pair_bias` scores
CrowS-Pairs-style sentence pairs; :mod:`~icp_lens.evaluation.perplexity` measures
what a mitigation costs on ordinary text; :func:`~icp_lens.evaluation.margins.next_token_margins`
gives each example's answer-minus-alternatives logit margin in one forward pass, and
:func:`~icp_lens.evaluation.group_gap.group_gap` the difference of two groups' mean margins
(a stereotype gap, when the groups are the spurious attribute's values).
"""

from icp_lens.evaluation.group_gap import GroupGap, group_gap
from icp_lens.evaluation.margins import next_token_margins
from icp_lens.evaluation.metrics import (
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
    pair_bias_score,
    robustness_score,
    sensitive_attribute,
    sensitivity,
    worst_group_accuracy,
)
from icp_lens.evaluation.pair_bias import PairBiasResult, pair_bias, sentence_loglik
from icp_lens.evaluation.perplexity import PerplexityResult, perplexity
from icp_lens.evaluation.predictions import Predictions, predict_examples
from icp_lens.evaluation.report import METRICS, EvalReport, compare_reports, evaluate, evaluate_predictions

__all__ = [
    "METRICS",
    "EvalReport",
    "GroupGap",
    "InsufficientDataError",
    "PairBiasResult",
    "PerplexityResult",
    "Predictions",
    "accuracy",
    "bootstrap_ci",
    "causal_robustness_ratio",
    "compare_reports",
    "demographic_parity_diff",
    "equal_opportunity_gap",
    "equalized_odds",
    "evaluate",
    "evaluate_predictions",
    "expected_calibration_error",
    "flip_rate",
    "gap_closed",
    "group_accuracy",
    "group_gap",
    "next_token_margins",
    "pair_bias",
    "pair_bias_score",
    "perplexity",
    "predict_examples",
    "robustness_score",
    "sensitive_attribute",
    "sensitivity",
    "sentence_loglik",
    "worst_group_accuracy",
]

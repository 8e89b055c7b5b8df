"""Counterfactual pairs from a spec: the data engine behind scoring and consistency fine-tuning.

A researcher names an attribute that must not matter (``spurious``, grouped), the
values that legitimately decide the answer (``causal``), the answer per group and a few
templates with one slot ``{x}``; :func:`generate_pairs` writes every prompt with a
spurious value, its spurious counterfactual (a value of another group, same token
length so the two align position by position) and a causal counterfactual (an explicit
value of another group, whose answer differs), plus the explicit-cue task prompts::

    from icp_lens.counterfactuals import PairSpec, generate_pairs

    spec = PairSpec.load("spec.json")
    result = generate_pairs(spec, tokenizer, holdout=0.25, seed=0)
    result.write("pairs_dir")        # pairs.jsonl, task.jsonl, heldout_*.jsonl, report.json, report.md

``icp-lens pairs --spec SPEC.json --model M --out DIR`` does the same from the shell.

Beside templates: :func:`generate_substitution_pairs` (controlled word swaps over real
sentences, :mod:`~icp_lens.counterfactuals.substitution`) and
:func:`generate_rewrite_pairs` (an instruct model rewrites them,
:mod:`~icp_lens.counterfactuals.rewrite`); :func:`apply_checks` runs the quality checks
of :mod:`~icp_lens.counterfactuals.quality` on any of them. :func:`audit_model` measures how
much a model uses each attribute and returns a table, the task's :class:`CausalGraph`
with the measured edges, and a figure.
"""

from icp_lens.counterfactuals.audit import (
    SpuriousnessRatio,
    conditional_mutual_information,
    mutual_information,
    sensitivity,
    spuriousness_ratio,
)
from icp_lens.counterfactuals.graph import AuditResult, CausalGraph, audit_model
from icp_lens.counterfactuals.quality import QualityReport, QualityThresholds, SentenceEncoder, apply_checks, check_pairs
from icp_lens.counterfactuals.rewrite import generate_rewrite_pairs
from icp_lens.counterfactuals.spec import PairSpec, SpecError
from icp_lens.counterfactuals.substitution import SwapList, generate_substitution_pairs, read_labelled_texts
from icp_lens.counterfactuals.templates import PairsResult, generate_pairs

__all__ = [
    "PairSpec",
    "SpecError",
    "PairsResult",
    "generate_pairs",
    "mutual_information",
    "conditional_mutual_information",
    "SpuriousnessRatio",
    "spuriousness_ratio",
    "sensitivity",
    "SwapList",
    "read_labelled_texts",
    "generate_substitution_pairs",
    "generate_rewrite_pairs",
    "QualityThresholds",
    "QualityReport",
    "SentenceEncoder",
    "check_pairs",
    "apply_checks",
    "CausalGraph",
    "AuditResult",
    "audit_model",
]

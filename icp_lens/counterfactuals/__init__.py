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
"""

from icp_lens.counterfactuals.audit import (
    SpuriousnessRatio,
    conditional_mutual_information,
    mutual_information,
    sensitivity,
    spuriousness_ratio,
)
from icp_lens.counterfactuals.spec import PairSpec, SpecError
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
]

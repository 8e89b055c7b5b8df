"""Planted-shortcut model organisms: tiny causal LMs whose ground truth is known.

Each organism is a 2-layer transformer (GPT-2, Llama with grouped-query attention, or
GPT-NeoX) trained from scratch to classify a synthetic review as next-token
prediction (``... ->`` then ``pos`` / ``neg``). The review holds a *true cue* (one
sentiment word, agreeing with the label 92% of the time) and a *planted shortcut*
(a token agreeing with the label 97% of the time in training, absent from a quarter
of the training prompts). The trained model follows the shortcut when it is present,
yet still encodes the true cue, which is what a pruning method should recover::

    from icp_lens.organisms import build_organism

    org = build_organism(variant="tag", arch="llama", seed=0)   # cached after the first call
    org.report.to_frame()                 # acceptance checks
    probes = org.probes("test_balanced")  # ProbeExample list with counterfactuals
    bridge = org.load_bridge()            # TransformerBridge on the HF checkpoint

See :mod:`icp_lens.organisms.task` for the task and splits,
:mod:`icp_lens.organisms.train` for models and training, and
:mod:`icp_lens.organisms.build` for building, caching and the report.
"""

from icp_lens.organisms.build import (
    THRESHOLDS,
    VERSION,
    Organism,
    OrganismReport,
    OrganismSpec,
    build_organism,
    default_cache_dir,
)
from icp_lens.organisms.task import (
    SPLITS,
    VARIANTS,
    Split,
    TaskSpec,
    Variant,
    build_tokenizer,
    generate_split,
)
from icp_lens.organisms.train import (
    ARCHS,
    AccuracyResult,
    Arch,
    evaluate_accuracy,
    predict,
)

__all__ = [
    "ARCHS",
    "SPLITS",
    "THRESHOLDS",
    "VARIANTS",
    "VERSION",
    "AccuracyResult",
    "Arch",
    "Organism",
    "OrganismReport",
    "OrganismSpec",
    "Split",
    "TaskSpec",
    "Variant",
    "build_organism",
    "build_tokenizer",
    "default_cache_dir",
    "evaluate_accuracy",
    "generate_split",
    "predict",
]

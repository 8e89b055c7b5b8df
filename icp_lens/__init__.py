"""icp_lens: intervention-based causal pruning for TransformerLens models.

Find the internal features (MLP neurons, attention heads, residual dimensions, value
vectors) through which a spurious input attribute drives a transformer's output, and
remove them. See ``icp_lens.features``, ``icp_lens.interventions`` and
``icp_lens.organisms`` for the method's vocabulary.
"""

from icp_lens.edits import Edit, intervene, pack_edits, run_packed, run_with_edits
from icp_lens.features import FEATURE_KINDS, Feature, FeatureKind, enumerate_features, hook_name_for
from icp_lens.hooks import active_hook_count, capturing, hooked
from icp_lens.interventions import (
    Constant,
    Intervention,
    Mean,
    Resample,
    Scale,
    Swap,
    Zero,
    fit_means,
    resample_from,
)
from icp_lens.model import (
    ModelDims,
    UnknownHookError,
    boot_bridge,
    hf_model,
    hook_names,
    model_dims,
    resolve_hook_point,
    to_tokens,
)

__version__ = "0.1.0"

__all__ = [
    "FEATURE_KINDS",
    "Constant",
    "Edit",
    "Feature",
    "FeatureKind",
    "Intervention",
    "Mean",
    "ModelDims",
    "Resample",
    "Scale",
    "Swap",
    "UnknownHookError",
    "Zero",
    "active_hook_count",
    "boot_bridge",
    "capturing",
    "enumerate_features",
    "fit_means",
    "hf_model",
    "hook_name_for",
    "hook_names",
    "hooked",
    "intervene",
    "model_dims",
    "pack_edits",
    "resample_from",
    "resolve_hook_point",
    "run_packed",
    "run_with_edits",
    "to_tokens",
]

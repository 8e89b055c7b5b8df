"""Direction features: fit, apply, score and fold a spurious direction (see ``core``).

>>> from icp_lens.directions import fit_directions, applying_directions, fold_directions
>>> dirs = fit_directions(bridge, probes, source="leace", layers=(3,))     # DirectionSet
>>> with applying_directions(bridge, dirs, mode="mean"):                     # run time
...     logits = bridge(tokens)
>>> hf, stats = fold_directions(hf_model, dirs, mode="mean")                 # weights
"""

from icp_lens.directions.core import DIRECTION_MODES, Direction, DirectionMode, DirectionSet, sidecar_path
from icp_lens.directions.estimators import diff_means, leace, orthogonal_to, probe_directions
from icp_lens.directions.fit import DIRECTION_SOURCES, DirectionFit, fit_directions
from icp_lens.directions.fold import FOLDABLE_TYPES, FoldStats, fold_directions
from icp_lens.directions.intervene import applying_directions, direction_hooks, hf_directions, residual_writers
from icp_lens.directions.scoring import direction_effects

__all__ = [
    "Direction",
    "DirectionSet",
    "DirectionMode",
    "DIRECTION_MODES",
    "DIRECTION_SOURCES",
    "DirectionFit",
    "FOLDABLE_TYPES",
    "FoldStats",
    "fit_directions",
    "diff_means",
    "leace",
    "probe_directions",
    "orthogonal_to",
    "applying_directions",
    "direction_hooks",
    "hf_directions",
    "residual_writers",
    "fold_directions",
    "direction_effects",
    "sidecar_path",
]

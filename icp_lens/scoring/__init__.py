"""Stage 1 of the method: score every feature by the causal effect of intervening on it.

``score(model, probes)`` is the entry point (hybrid: attribution ranks every feature,
exact patching verifies the top ones); the result is a ``ScoreTable``.
"""

from icp_lens.scoring.attribution import attribution_effects
from icp_lens.scoring.effects import UNSIGNED_ESTIMATORS, Effects, InterventionSpec, probe_means
from icp_lens.scoring.exact import exact_effects
from icp_lens.scoring.hybrid import METHODS, all_features, score
from icp_lens.scoring.table import ScoreTable
from icp_lens.scoring.tokens import TokenScoreTable, icp_select_tokens, score_tokens, token_ablation_mode

__all__ = [
    "METHODS",
    "Effects",
    "InterventionSpec",
    "ScoreTable",
    "TokenScoreTable",
    "UNSIGNED_ESTIMATORS",
    "all_features",
    "attribution_effects",
    "exact_effects",
    "icp_select_tokens",
    "probe_means",
    "score",
    "score_tokens",
    "token_ablation_mode",
]

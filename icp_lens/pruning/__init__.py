"""Stage 2, approach 1: remove flagged features from the weights of an HF checkpoint.

Selection (``select_features``, ``hybrid_split``) -> ``PrunePlan`` (JSON: features, mode,
means, model fingerprint, provenance) -> per-architecture weight edit -> atomic export
-> verification against the hook-ablated original. The result loads with
``transformers`` alone. See ``icp_lens.pruning.api`` for the one-call versions, and
``icp_lens.pruning.tokens`` for token-embedding features (a plan's ``tokens``).
"""

from icp_lens.pruning.ablate import hf_ablation, plan_edits
from icp_lens.pruning.api import PruneResult, apply_plan, make_plan, prune
from icp_lens.pruning.arch import ARCHS, PRUNABLE_KINDS, ArchSpec, site_of
from icp_lens.pruning.export import export_checkpoint
from icp_lens.pruning.hf_edit import EditStats, apply_plan_to_model
from icp_lens.pruning.means import feature_means
from icp_lens.pruning.plan import (
    PLAN_FILE,
    Fingerprint,
    PlanMismatchError,
    PruneMode,
    PrunePlan,
    TokenRow,
    fingerprint,
)
from icp_lens.pruning.select import HybridSplit, hybrid_split, select_features
from icp_lens.pruning.source import clean_hf_model, load_checkpoint
from icp_lens.pruning.tokens import (
    check_token_ids,
    edit_token_rows,
    embedding_mean,
    hooked_token_ablation,
    prune_token_embeddings,
    token_ablation,
)
from icp_lens.pruning.verify import VerificationReport, verify_export

__all__ = [
    "ARCHS",
    "PLAN_FILE",
    "PRUNABLE_KINDS",
    "ArchSpec",
    "EditStats",
    "Fingerprint",
    "HybridSplit",
    "PlanMismatchError",
    "PruneMode",
    "PrunePlan",
    "PruneResult",
    "TokenRow",
    "VerificationReport",
    "apply_plan",
    "apply_plan_to_model",
    "check_token_ids",
    "clean_hf_model",
    "edit_token_rows",
    "embedding_mean",
    "export_checkpoint",
    "feature_means",
    "fingerprint",
    "hf_ablation",
    "hooked_token_ablation",
    "hybrid_split",
    "load_checkpoint",
    "make_plan",
    "plan_edits",
    "prune",
    "prune_token_embeddings",
    "select_features",
    "site_of",
    "token_ablation",
    "verify_export",
]

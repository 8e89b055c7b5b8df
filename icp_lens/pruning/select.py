"""Choosing the features to prune from a score table.

``select_features`` applies, in order: a filter to prunable kinds (residual dimensions,
queries and keys cannot be pruned; their rows of a score table are skipped), an
optional minimum selectivity, the threshold tau (``score > tau``), per-layer caps (at
most ``per_layer_cap`` features from any one layer, the highest scoring kept) and
``top_k``. ``hybrid_split`` returns two disjoint sets: the extreme features to prune and
the moderate ones to hand to the invariance trainer, which keeps their capacity while
making the output independent of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from icp_lens.features import Feature
from icp_lens.pruning.arch import PRUNABLE_KINDS, unprunable_reason

__all__ = ["select_features", "HybridSplit", "hybrid_split", "score_frame", "SELECTABLE_KINDS"]

#: kinds a prune may select: the prunable units, fitted directions and token-embedding rows, and a
#: vision-language model's vision-tower neurons and heads, its projector's hidden neurons (``icp_lens.pruning.multimodal``) and
#: directions of its image tokens (``icp_lens.directions.image``)
SELECTABLE_KINDS: tuple[str, ...] = (*PRUNABLE_KINDS, "direction", "token", "vision_neuron", "vision_head",
                                     "image_direction", "projector_neuron")  # fmt: skip


def score_frame(scores: Any) -> pd.DataFrame:
    """A score frame (kind, layer, index, score, ...; most spurious first) from a ScoreTable,
    a DataFrame, a CSV/parquet path, or a list of features (in priority order, no scores)."""
    from icp_lens.scoring.table import ScoreTable

    if isinstance(scores, (str, Path)):
        scores = ScoreTable.load(scores)
    if isinstance(scores, ScoreTable):
        return scores.frame
    if isinstance(scores, pd.DataFrame):
        missing = [c for c in ("kind", "layer", "index") if c not in scores.columns]
        if missing:
            raise ValueError(f"A score frame needs columns kind, layer, index (and score); missing {missing}")
        frame = scores.copy()
        if "score" in frame:
            frame = frame.sort_values("score", ascending=False, kind="stable")
        return frame.reset_index(drop=True)
    feats = [Feature.parse(f) if isinstance(f, str) else f for f in scores]
    if not all(isinstance(f, Feature) for f in feats):
        raise TypeError("Expected a ScoreTable, a DataFrame, a path or a list of Features / feature labels")
    return pd.DataFrame(
        {"kind": [f.kind for f in feats], "layer": [f.layer for f in feats], "index": [f.index for f in feats]}
    )


def _features(frame: pd.DataFrame) -> list[Feature]:
    sites = frame["site"] if "site" in frame.columns else [""] * len(frame)
    return [
        Feature(str(k), int(lay), int(i), s if isinstance(s, str) else "")
        for k, lay, i, s in zip(frame["kind"], frame["layer"], frame["index"], sites, strict=True)
    ]


def select_features(
    scores: Any,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    per_layer_cap: int | None = None,
    kinds: Sequence[str] = PRUNABLE_KINDS,
    min_selectivity: float | None = None,
    min_share: float | None = None,
) -> list[Feature]:
    """Features to prune, most spurious first (see the module docstring for the order of rules).

    ``min_share`` keeps rows whose score is at least that share of the top score among the
    kinds considered (the ICP threshold rule ``S >= min_share * max S``); ``kinds`` may
    include ``direction`` and ``token``.
    """
    if threshold is None and top_k is None and min_share is None:
        raise ValueError("Choose features with threshold=..., top_k=... or both (or min_share=...)")
    bad = sorted(set(kinds) - set(SELECTABLE_KINDS))
    if bad:
        raise ValueError(unprunable_reason(bad, f"kinds {bad}"))
    for name, value in (("top_k", top_k), ("per_layer_cap", per_layer_cap)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    frame = score_frame(scores)
    frame = frame[frame["kind"].isin(list(kinds))]
    if top_k is not None and top_k > len(frame):
        warnings.warn(
            f"top_k={top_k} but the table has only {len(frame)} rows of kinds {list(kinds)}: every one of them "
            "can be selected. Check the table and --kinds.",
            stacklevel=2,
        )
    top_score = float(frame["score"].max()) if "score" in frame and len(frame) else 0.0
    if min_selectivity is not None:
        if "selectivity" not in frame:
            raise ValueError("min_selectivity needs a score table with a selectivity column")
        frame = frame[frame["selectivity"] >= min_selectivity]
    if threshold is not None:
        if "score" not in frame:
            raise ValueError("threshold needs scores; a plain feature list only supports top_k")
        frame = frame[frame["score"] > threshold]
    if min_share is not None:
        if not 0 <= min_share <= 1:
            raise ValueError(f"min_share must be in [0, 1], got {min_share}")
        frame = frame[(frame["score"] > 0) & (frame["score"] >= min_share * top_score)]
    if per_layer_cap is not None:
        frame = frame[frame.groupby("layer").cumcount() < per_layer_cap]
    if top_k is not None:
        frame = frame.head(top_k)
    return _features(frame)


@dataclass(frozen=True)
class HybridSplit:
    """Extreme features to prune and moderate ones to regularise (disjoint)."""

    prune: tuple[Feature, ...]
    regularise: tuple[Feature, ...]


def hybrid_split(
    scores: Any,
    *,
    prune_threshold: float | None = None,
    prune_top_k: int | None = None,
    regularise_threshold: float | None = None,
    regularise_top_k: int | None = None,
    per_layer_cap: int | None = None,
    kinds: Sequence[str] = PRUNABLE_KINDS,
) -> HybridSplit:
    """Prune the top of the ranking; regularise the next band (threshold and/or count)."""
    prune = select_features(
        scores, threshold=prune_threshold, top_k=prune_top_k, per_layer_cap=per_layer_cap, kinds=kinds
    )
    chosen = set(prune)
    frame = score_frame(scores)
    rest = frame[[f not in chosen for f in _features(frame)]]
    regularise = select_features(rest, threshold=regularise_threshold, top_k=regularise_top_k, kinds=kinds)
    return HybridSplit(prune=tuple(prune), regularise=tuple(regularise))

"""Choosing which scored features to remove, on the train split only.

A feature with a large spurious effect ``S`` (the profession swap moves the pronoun
through it) may also carry the true cause (``C``: an explicit "the woman" moves it as
much). Removing such a feature removes gender altogether: the stereotype gap shrinks,
but so does the model's ability to follow an explicit cue. The selectivity
``S / (S + C)`` separates the two: above 0.5 the feature reacts more to the profession
than to explicit gender.

:func:`selection_grid` tries every (selectivity floor, k) pair: the ``k`` highest-``S``
features above the floor, ablated at run time on the bridge (hooks, no export), and
measures on the **train** probes the stereotype gap and the explicit-cue accuracy, and
on ``texts`` (ordinary text kept apart from the evaluation's) the perplexity rise.
:func:`choose` keeps the pair that cuts the train gap most while the explicit accuracy
stays above a floor and the perplexity rise below a ceiling (ties: fewer features).
The held-out split is never looked at, so the evaluation that follows is an honest
estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from examples.smollm2_case.pronouns import stereotype_gap
from icp_lens.edits import Edit, intervene
from icp_lens.features import Feature
from icp_lens.interventions import Intervention, Zero
from icp_lens.metrics import logit_diff
from icp_lens.probeset import ProbeSet
from icp_lens.scoring.table import ScoreTable

__all__ = ["candidates", "selection_grid", "choose"]


def _frame(table: ScoreTable | pd.DataFrame) -> pd.DataFrame:
    frame = table.frame if isinstance(table, ScoreTable) else table
    if "selectivity" not in frame.columns or frame["selectivity"].isna().all():
        raise ValueError("selection needs a selectivity column: score with causal counterfactuals")
    return frame


def candidates(table: ScoreTable | pd.DataFrame, threshold: float, k: int) -> list[Feature]:
    """The ``k`` highest-score features whose selectivity is at least ``threshold``."""
    frame = _frame(table)
    kept = frame[frame["selectivity"] >= threshold].sort_values("score", ascending=False).head(k)
    return [f if isinstance(f, Feature) else Feature.parse(f) for f in kept["feature"]]


@torch.no_grad()
def _margins(bridge: Any, probes: ProbeSet, edits: Sequence[Edit], batch_size: int) -> np.ndarray:
    out = np.zeros(len(probes))
    with intervene(bridge, list(edits)):
        for batch in probes.batches(batch_size):
            out[batch.index.cpu().numpy()] = logit_diff(bridge(batch.tokens)[:, -1], batch).double().cpu().numpy()
    return out


def selection_grid(
    bridge: Any,
    table: ScoreTable | pd.DataFrame,
    probes: ProbeSet,
    explicit: ProbeSet,
    *,
    thresholds: Sequence[float],
    ks: Sequence[int],
    ablation: dict[Feature, Intervention] | None = None,
    texts: Sequence[str] | None = None,
    text_tokens: int = 64,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (threshold, k): ``threshold, k, n_features, n_exact, gap, gap_cut, explicit_accuracy,
    perplexity_rise, features``.

    ``perplexity_rise`` (``ppl_ablated / ppl_original - 1`` on ``texts``, each cut to
    ``text_tokens`` tokens) is NaN without ``texts``.
    ``features`` holds the feature labels joined by ``";"`` (``Feature.parse`` reads each back).

    ``ablation`` maps each feature to its intervention (e.g. the ``Mean`` of
    ``icp_lens.scoring.probe_means``); features missing from it are zeroed. The first
    row (``k = 0``) is the unablated model.
    """
    frame = _frame(table)
    exact = dict(
        zip(frame["feature"].astype(str), frame.get("exact", pd.Series(False, index=frame.index)), strict=True)
    )
    base_gap = stereotype_gap(_margins(bridge, probes, [], batch_size), probes.examples).gap
    base_acc = float((_margins(bridge, explicit, [], batch_size) > 0).mean())

    def ppl(edits: Sequence[Edit]) -> float:
        if not texts:
            return float("nan")
        from icp_lens.evaluation.perplexity import perplexity

        with intervene(bridge, list(edits)):
            return perplexity(bridge, bridge.tokenizer, texts, max_tokens=text_tokens, batch_size=batch_size).perplexity

    base_ppl = ppl([])
    rows: list[dict[str, Any]] = [
        dict(threshold=np.nan, k=0, n_features=0, n_exact=0, gap=base_gap, gap_cut=0.0,
             explicit_accuracy=base_acc, perplexity_rise=0.0 if texts else np.nan, features="")
    ]  # fmt: skip
    pairs = [(t, k) for t in thresholds for k in ks]
    from tqdm.auto import tqdm

    for threshold, k in tqdm(pairs, desc="selection grid", disable=not progress):
        feats = candidates(frame, threshold, k)
        edits = [Edit(f, (ablation or {}).get(f, Zero())) for f in feats]
        gap = stereotype_gap(_margins(bridge, probes, edits, batch_size), probes.examples).gap
        acc = float((_margins(bridge, explicit, edits, batch_size) > 0).mean())
        rows.append(
            dict(threshold=threshold, k=k, n_features=len(feats), n_exact=sum(bool(exact.get(str(f))) for f in feats),
                 gap=gap, gap_cut=1 - gap / base_gap, explicit_accuracy=acc,
                 perplexity_rise=ppl(edits) / base_ppl - 1, features=";".join(map(str, feats)))
        )  # fmt: skip
    return pd.DataFrame(rows)


def choose(
    grid: pd.DataFrame, *, min_explicit_accuracy: float = 0.95, max_perplexity_rise: float | None = None
) -> pd.Series:
    """The grid row with the largest train gap cut among those within both constraints.

    Constraints: explicit accuracy >= ``min_explicit_accuracy``; perplexity rise <=
    ``max_perplexity_rise`` (when given; needs the grid's ``perplexity_rise`` column).
    """
    ok = (grid["k"] > 0) & (grid["explicit_accuracy"] >= min_explicit_accuracy) & (grid["n_features"] > 0)
    if max_perplexity_rise is not None:
        if "perplexity_rise" not in grid.columns or grid["perplexity_rise"].isna().all():
            raise ValueError("max_perplexity_rise needs a grid measured with texts=... (perplexity_rise)")
        ok &= grid["perplexity_rise"] <= max_perplexity_rise
    ok = grid[ok]
    if ok.empty:
        limit = "" if max_perplexity_rise is None else f" and the perplexity rise <= {max_perplexity_rise:.1%}"
        raise ValueError(
            f"no (threshold, k) keeps the train explicit-cue accuracy >= {min_explicit_accuracy}{limit}; "
            "raise the selectivity floors or lower k"
        )
    return ok.sort_values(["gap_cut", "n_features"], ascending=[False, True]).iloc[0]

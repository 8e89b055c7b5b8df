"""ScoreTable: one row per feature, the result of scoring.

The frame is tidy: one row per feature, sorted by ``score`` (spuriousness ``S``, higher =
more spurious), with the columns

``kind, layer, index, hook_name, feature``   which feature (``feature`` = ``str(Feature)``)
``score, ci_low, ci_high``                   S and its bootstrap interval
``selectivity``                              S / (S + causal effect); NaN without causal probes
``exact``                                    True where the score comes from exact patching,
                                             False where it is an attribution estimate
``estimator``                                how: ``exact``, ``atp``, ``atp+qk``, ``ig``,
                                             ``graddrop`` or ``atp*`` (``Effects.estimator``)
``effect_<intervention>``                    mean |dP| under each intervention scored
``n_examples``                               probe examples the score averages over

``select(threshold=..., top_k=...)`` turns it into the features to prune or regularise;
``save``/``load`` use CSV or parquet by file suffix; ``plot_heatmap`` and ``plot_top`` return
matplotlib figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from icp_lens.features import ALL_KINDS, Feature
from icp_lens.scoring.effects import Effects
from icp_lens.scoring.spuriousness import Weight, bootstrap_ci, selectivity, spuriousness

__all__ = ["ScoreTable", "REQUIRED_COLUMNS"]

REQUIRED_COLUMNS: tuple[str, ...] = ("kind", "layer", "index", "hook_name", "score")


@dataclass(frozen=True)
class ScoreTable:
    """Scores of features, one row each (see the module docstring for the columns)."""

    frame: pd.DataFrame
    #: the fitted vectors of the table's ``direction`` rows (``icp_lens.directions.DirectionSet``),
    #: saved beside the table as ``<stem>.directions.safetensors``
    directions: Any = None
    #: where the scores come from (model fingerprint, probe digest, settings;
    #: ``icp_lens.scoring.provenance``), saved beside the table as ``<stem>.meta.json``
    meta: Any = None

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.frame.columns]
        if missing:
            raise ValueError(f"A score table needs the columns {list(REQUIRED_COLUMNS)}; missing {missing}")
        bad = sorted(set(self.frame["kind"]) - set(ALL_KINDS))
        if bad:
            raise ValueError(f"Unknown feature kinds {bad} in score table; valid: {list(ALL_KINDS)}")
        frame = self.frame.copy()
        if "feature" not in frame.columns:
            frame["feature"] = [str(f) for f in _features(frame)]
        frame = frame.sort_values(["score", "kind", "layer", "index"], ascending=[False, True, True, True])
        object.__setattr__(self, "frame", frame.reset_index(drop=True))

    def __len__(self) -> int:
        return len(self.frame)

    @classmethod
    def from_effects(
        cls,
        effects: Sequence[Effects],
        *,
        causal: Effects | None = None,
        weight: Weight = "uniform",
        n_boot: int = 200,
        seed: int = 0,
    ) -> ScoreTable:
        """Aggregate per-example effects into scores (see ``icp_lens.scoring.spuriousness``).

        ``effects`` are the spurious interventions (all over the same features, in the same
        order); ``causal`` the effects of patching from the causal counterfactual.
        """
        if not effects:
            raise ValueError("from_effects needs at least one Effects")
        features = effects[0].features
        for e in effects[1:] + ([causal] if causal is not None else []):
            if e.features != features:
                raise ValueError("All effects must cover the same features in the same order")
        score, values = spuriousness(effects, weight=weight)
        low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
        frame = pd.DataFrame(
            {
                "kind": [f.kind for f in features],
                "layer": [f.layer for f in features],
                "index": [f.index for f in features],
                "hook_name": [f.hook_name for f in features],
                "site": [f.site for f in features],
                "feature": [str(f) for f in features],
                "score": score.numpy(),
                "ci_low": low.numpy(),
                "ci_high": high.numpy(),
                "selectivity": float("nan"),
                "exact": all(e.exact for e in effects),
                "estimator": "+".join(dict.fromkeys(str(e.estimator) for e in effects)),
            }
        )
        for e in effects:
            frame[f"effect_{e.intervention}"] = e.values.float().abs().nanmean(1).numpy()
        if causal is not None:
            causal_effect = causal.values.float().abs().nanmean(1)
            frame[f"effect_{causal.intervention}"] = causal_effect.numpy()
            frame["selectivity"] = selectivity(score, causal_effect).numpy()
        frame["n_examples"] = (~torch.isnan(values)).sum(1).numpy()
        return cls(frame)

    def _repr_html_(self) -> str:  # notebooks show the frame
        return self.frame.head(20)._repr_html_()  # type: ignore[operator]

    @property
    def features(self) -> list[Feature]:
        """All features, most spurious first."""
        return _features(self.frame)

    def top(self, k: int = 20) -> pd.DataFrame:
        """The ``k`` highest-scoring rows."""
        return self.frame.head(k)

    def select(
        self,
        *,
        threshold: float | None = None,
        top_k: int | None = None,
        kinds: Sequence[str] | None = None,
        min_selectivity: float | None = None,
    ) -> list[Feature]:
        """Features with ``score > threshold`` and/or the ``top_k`` highest, most spurious first."""
        if threshold is None and top_k is None:
            raise ValueError("select needs threshold=..., top_k=... or both")
        frame = self.frame
        if kinds is not None:
            unknown = sorted(set(kinds) - set(ALL_KINDS))
            if unknown:
                raise ValueError(f"Unknown kinds {unknown}; valid: {list(ALL_KINDS)}")
            frame = frame[frame["kind"].isin(list(kinds))]
        if min_selectivity is not None:
            frame = frame[frame["selectivity"] >= min_selectivity]
        if threshold is not None:
            frame = frame[frame["score"] > threshold]
        if top_k is not None:
            if top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {top_k}")
            frame = frame.head(top_k)
        return _features(frame)

    # -- files ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write CSV (``.csv``) or parquet (``.parquet``), atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        if path.suffix == ".csv":
            self.frame.to_csv(tmp, index=False)
        elif path.suffix == ".parquet":
            self.frame.to_parquet(tmp, index=False)
        else:
            raise ValueError(f"Save a score table as .csv or .parquet, not {path.suffix or 'no suffix'!r}")
        if self.directions is not None:
            from icp_lens.directions import sidecar_path

            self.directions.save(sidecar_path(path))
        if self.meta is not None:
            import json

            from icp_lens.scoring.provenance import meta_path

            side = meta_path(path)
            side_tmp = side.with_name(f".{side.name}.tmp")
            side_tmp.write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
            side_tmp.replace(side)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        """Read a table written by ``save`` (or any CSV with the required columns)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No score table at {path}")
        try:
            if path.suffix == ".parquet":
                frame = pd.read_parquet(path)
            elif path.suffix == ".csv":
                frame = pd.read_csv(path)
            else:
                raise ValueError(f"Load a score table from .csv or .parquet, not {path.suffix!r}")
        except pd.errors.EmptyDataError:
            raise ValueError(f"{path} is empty: a score table needs the columns {list(REQUIRED_COLUMNS)}") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"{path} is not a readable score table: {err}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path} is not a score table: it lacks the columns {missing} of {list(REQUIRED_COLUMNS)}")
        meta = None
        from icp_lens.scoring.provenance import meta_path

        if meta_path(path).is_file():
            import json

            try:
                meta = json.loads(meta_path(path).read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{meta_path(path)}: not valid JSON ({err})") from None
        directions = None
        if "kind" in frame.columns and (frame["kind"] == "direction").any():
            from icp_lens.directions import DirectionSet, sidecar_path

            side = sidecar_path(path)
            if not side.is_file():
                raise FileNotFoundError(
                    f"{path} has direction rows but their vectors are missing: expected {side} beside it"
                )
            directions = DirectionSet.load(side)
        return cls(frame, directions, meta)

    # -- plots ----------------------------------------------------------------------
    def plot_heatmap(self, kind: str = "neuron", *, ax: Any = None) -> Any:
        """Layer x index heatmap of the score of one kind of feature (a matplotlib Figure)."""
        import matplotlib.pyplot as plt

        rows = self.frame[self.frame["kind"] == kind]
        if rows.empty:
            raise ValueError(f"No {kind} features in this table; kinds present: {sorted(set(self.frame['kind']))}")
        grid = rows.pivot_table(index="layer", columns="index", values="score", aggfunc="first")
        if ax is None:
            fig, ax = plt.subplots(figsize=(min(12, 2 + grid.shape[1] / 20), 1 + 0.4 * grid.shape[0]))
        else:
            fig = ax.figure
        image = ax.imshow(grid.to_numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
        ax.set_xlabel(f"{kind} index")
        ax.set_ylabel("layer")
        ax.set_title(f"spuriousness S of each {kind}")
        fig.colorbar(image, ax=ax, label="S")
        return fig

    def plot_top(self, k: int = 20, *, ax: Any = None) -> Any:
        """Horizontal bars of the ``k`` most spurious features with their intervals."""
        import matplotlib.pyplot as plt

        top = self.top(k).iloc[::-1]
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 1 + 0.25 * len(top)))
        else:
            fig = ax.figure
        xerr = None
        if {"ci_low", "ci_high"} <= set(top.columns) and top["ci_low"].notna().all():
            xerr = [top["score"] - top["ci_low"], top["ci_high"] - top["score"]]
        from icp_lens.plotting import COLORS, label_bars, style

        colors = [COLORS["exact"] if e else COLORS["estimate"] for e in top.get("exact", [True] * len(top))]
        ax.barh(top["feature"], top["score"], xerr=xerr, color=colors)
        label_bars(ax, "{:.3f}")
        style(ax, title=f"top {len(top)} features", xlabel="spuriousness S (blue: exact, gray: estimate)", grid="x")
        fig.tight_layout()
        return fig


def _features(frame: pd.DataFrame) -> list[Feature]:
    sites = frame["site"] if "site" in frame.columns else [""] * len(frame)
    return [
        Feature(str(k), int(layer), int(i), "" if not isinstance(s, str) else s)  # type: ignore[arg-type]
        for k, layer, i, s in zip(frame["kind"], frame["layer"], frame["index"], sites, strict=True)
    ]

"""Model selection: validation evaluations, their history, early stopping and the best weights.

Every ``eval_every`` steps (and at the end) the trainer evaluates the current model on
the validation data (:func:`~icp_lens.training.evaluate.evaluate_data`, with the pruning
plan's features ablated) and appends a ``kind="val"`` row to the history. When
``TrainConfig.early_stopping`` names a metric, the evaluation is also a model-selection
step: a value better than the best so far by more than ``min_delta`` (higher or lower is
better per :data:`~icp_lens.training.config.HIGHER_IS_BETTER`) records the step and a
copy of the trainable weights; ``patience`` evaluations in a row without one stop the
run, and ``fit`` then restores the best weights (``restore_best``).

The loop's selection state (``best``, ``best_step``, ``bad_evals``, ``stopped_early``)
lives in the loop-state dict that checkpoints carry, so a resumed run selects exactly as
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import Tensor

from icp_lens.probes import ProbeExample
from icp_lens.training.config import HIGHER_IS_BETTER
from icp_lens.training.data import TrainData, read_examples
from icp_lens.training.evaluate import evaluate_data

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.training.trainer import Trainer

__all__ = ["SelectionMixin"]


class SelectionMixin:
    """``Trainer``'s evaluation, history and early-stopping methods."""

    def evaluate(self: Trainer, data: TrainData | str | Path | Sequence[ProbeExample] | None = None) -> dict[str, Any]:
        """Validation metrics of the current model (pruned features ablated)."""
        if data is None:
            if self.val_data is None:
                raise ValueError("No validation data: pass data=... or give the trainer val=...")
            data = self.val_data
        elif not isinstance(data, TrainData):
            data = TrainData(self.model, read_examples(data, self.tokenizer))
        with self.pruned():
            return evaluate_data(self.model, data)

    @property
    def history(self: Trainer) -> pd.DataFrame:
        """One row per log (``kind="train"``: mean loss terms, lr, grad norm) or evaluation (``"val"``)."""
        return pd.DataFrame(self._history)

    def _evaluate_and_track(
        self: Trainer, s: dict[str, Any], best: dict[str, Tensor] | None, step: int, per_epoch: int
    ) -> dict[str, Tensor] | None:
        """Evaluate, log, and update the early-stopping state ``s``; returns the best weights so far."""
        cfg = self.config
        metrics = self.evaluate()
        self._history.append({"step": step, "epoch": step / per_epoch, "kind": "val", **metrics})
        if cfg.early_stopping is None:
            return best
        value = metrics[cfg.early_stopping]
        if value is None:
            raise ValueError(f"Validation metric {cfg.early_stopping!r} is undefined on the validation data")
        sign = 1.0 if HIGHER_IS_BETTER[cfg.early_stopping] else -1.0
        if s["best"] is None or sign * (value - s["best"]) > cfg.min_delta:
            s["best"], s["best_step"], s["bad_evals"] = value, step, 0
            return {k: v.detach().clone() for k, v in self.trainable.items()}
        s["bad_evals"] += 1
        if s["bad_evals"] >= cfg.patience:
            s["stopped_early"] = True
        return best

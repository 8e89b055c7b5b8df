"""What a training run returns: :class:`TrainResult`, the history plus the end state and timings.

``Trainer.fit`` returns one; ``Trainer.export`` writes its JSON-ready part
(:meth:`TrainResult.to_dict`, NaN written as ``null``) into ``training.json`` next to the
weights, and the history into ``history.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from icp_lens.jsonsafe import jsonable  # re-exported: training.result.jsonable is public

__all__ = ["TrainResult", "jsonable"]


@dataclass(frozen=True)
class TrainResult:
    """What a run did: the history (one row per log / evaluation), the end state, timings.

    ``steps`` is how many optimisation steps ran (``total_steps`` were planned);
    ``best_step`` / ``best_metric`` the best validation evaluation when early stopping
    watched a metric; ``final`` the validation metrics of the returned weights;
    ``seconds`` the wall-clock time of ``fit``.
    """

    history: pd.DataFrame = field(repr=False)
    steps: int
    total_steps: int
    best_step: int | None
    best_metric: float | None
    stopped_early: bool
    final: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Everything but the history."""
        return {k: v for k, v in self.__dict__.items() if k != "history"}

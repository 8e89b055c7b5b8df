"""``train()``: build a trainer, fit it and export the result, in one call.

The shortest path from a model and training data to a debiased checkpoint::

    from icp_lens.training import TrainConfig, train

    trainer, result = train("runs/lexical/model", "runs/lexical/train.jsonl",
                            TrainConfig(objective="invariance", lora=True),
                            features=features, val="runs/lexical/probe.jsonl", out="runs/invariant")

It is :class:`~icp_lens.training.trainer.Trainer` ``(...)``, ``.fit(resume=...)`` and,
with ``out``, ``.export(out, result=...)`` (verified); use the class directly for
anything in between (evaluating before training, a callback, another export target).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icp_lens.features import Feature
from icp_lens.probes import ProbeExample
from icp_lens.pruning.plan import PrunePlan
from icp_lens.training.config import TrainConfig
from icp_lens.training.result import TrainResult

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.training.trainer import Trainer

__all__ = ["train"]


def train(
    model: Any,
    train: str | Path | Sequence[ProbeExample],
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    features: Sequence[Feature | str] = (),
    prune: Sequence[Feature | str] | PrunePlan = (),
    val: str | Path | Sequence[ProbeExample] | None = None,
    pairs: str | Path | Sequence[ProbeExample] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> tuple[Trainer, TrainResult]:
    """Build a :class:`Trainer`, fit it, and export to ``out`` when given; returns both."""
    from icp_lens.training.trainer import Trainer  # the trainer module re-exports this function

    trainer = Trainer(
        model, train, config, features=features, prune=prune, val=val, pairs=pairs, checkpoint_dir=checkpoint_dir
    )
    result = trainer.fit(resume=resume)
    if out is not None:
        trainer.export(out, overwrite=overwrite, result=result)
    return trainer, result

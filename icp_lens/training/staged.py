"""Two-stage training: a wide pool teaches the rule, a short early-stopped stage pins its own prompts.

``fit_staged(trainer)`` runs ``trainer.fit()`` and then, when ``config.stage2_steps > 0``,
a second :class:`~icp_lens.training.Trainer` that starts from the first stage's merged
weights (LoRA merged into a copy) and trains with the same objective, task data and
retain pool on the pair pool alone (or ``stage2_pairs``), for at most ``stage2_steps``
steps. Every ``stage2_check_every`` steps it measures the flip rate of those same pairs,
which are training data (no held-out prompt is involved), and stops ``stage2_patience``
checks after the last drop, keeping the earliest weights with the fewest flips.

Why: consistency training on a wide pool of counterfactual pairs brings most prompts'
answers to the same value under a spurious swap, but leaves many near 50/50, where a
small residual difference still flips the argmax. A short second stage on the pool
removes those flips; a long one fits the seen values alone and the unseen ones drift
apart again (on SmolLM2 gender: stage 2 fixed at 30 steps gave held-out gaps 0.44 / 0.53,
early-stopped 0.08 / 0.15; README, "Counterfactual pairs").

The returned ``TrainResult`` spans both stages: ``steps``, ``total_steps`` and
``seconds`` are sums, ``history`` has a ``stage`` column (1, 2) with the second stage's
steps counted on, ``best_step`` / ``best_metric`` / ``stopped_early`` are the second
stage's early stopping, and ``final`` is the validation data's metrics (the first
trainer's ``val``) when there is one, else the second stage's pair metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.probes import ProbeExample
    from icp_lens.training.result import TrainResult
    from icp_lens.training.trainer import Trainer

__all__ = ["fit_staged", "chain_results", "stage2_config"]


def stage2_config(config: Any) -> Any:
    """The second stage's settings: the first's, early-stopped on the pairs' flip rate."""
    n = config.stage2_steps
    return replace(
        config, max_steps=n, epochs=n, log_every=max(1, n // 6), early_stopping="flip_rate",
        eval_every=config.stage2_check_every, patience=config.stage2_patience, stage2_steps=0, checkpoint_every=None,
    )  # fmt: skip


def fit_staged(
    trainer: Trainer,
    *,
    resume: bool = False,
    stage2_pairs: str | Path | Sequence[ProbeExample] | None = None,
) -> tuple[Trainer, TrainResult]:
    """Train ``trainer`` and, if ``config.stage2_steps > 0``, the second stage; returns (the last trainer, result).

    Export with the returned trainer (``trainer.export(out)``): it holds the final weights.
    """
    from icp_lens.training.trainer import Trainer

    config = trainer.config
    if config.stage2_steps and trainer.plan is not None:
        raise ValueError("stage2_steps does not combine with pruning (prune=...): train one stage, or prune after")
    first = trainer.fit(resume=resume)
    if config.stage2_steps == 0:
        return trainer, first
    pairs: Any = stage2_pairs
    if pairs is None:
        if trainer.pair_data is None:
            raise ValueError("stage2_steps needs counterfactual pairs (pairs=..., or training examples with them)")
        pairs = list(trainer.pair_data.examples)
    retain = None if trainer.retain_data is None else list(trainer.retain_data.texts)
    checkpoints = None if trainer.checkpoint_dir is None else trainer.checkpoint_dir / "stage2"
    second = Trainer(
        trainer.trained_hf_model(), list(trainer.train_data.examples), stage2_config(config),
        tokenizer=trainer.tokenizer, pairs=pairs, retain=retain, val=pairs, features=trainer.features,
        checkpoint_dir=checkpoints, device=trainer.device,
    )  # fmt: skip
    result = chain_results(first, second.fit(resume=resume))
    if trainer.val_data is not None:  # report the user's validation data, not the pairs stage 2 stopped on
        result = replace(result, final=second.evaluate(list(trainer.val_data.examples)))
    return second, result


def chain_results(first: TrainResult, second: TrainResult) -> TrainResult:
    """One ``TrainResult`` for two runs in a row: counts and times summed, ``second``'s steps counted on."""
    later = second.history.assign(stage=2, step=second.history["step"] + first.steps)
    return replace(
        second, history=pd.concat([first.history.assign(stage=1), later], ignore_index=True),
        steps=first.steps + second.steps, total_steps=first.total_steps + second.total_steps,
        seconds=first.seconds + second.seconds,
        best_step=None if second.best_step is None else second.best_step + first.steps,
    )  # fmt: skip

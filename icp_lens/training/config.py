"""Training settings: one frozen, validated dataclass.

``TrainConfig`` holds every option of a run (objective and its weight, optimiser and
schedule, interventions, LoRA, evaluation, early stopping, checkpoints, re-scoring); its
``__post_init__`` only validates (and resolves ``lam=None`` to the objective's default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from icp_lens.pruning.plan import PruneMode
from icp_lens.training.losses import DIVERGENCES, Divergence
from icp_lens.training.objectives import INTERVENTIONS, OBJECTIVES, Objective, term_weights

__all__ = ["DEFAULT_LAMBDA", "PAIR_RECIPE", "STOP_METRICS", "StopMetric", "TaskLoss", "TrainConfig", "HIGHER_IS_BETTER"]

StopMetric = Literal["worst_group_accuracy", "accuracy", "counterfactual_accuracy", "loss", "flip_rate"]
STOP_METRICS: tuple[str, ...] = get_args(StopMetric)
HIGHER_IS_BETTER = {"worst_group_accuracy": True, "accuracy": True, "counterfactual_accuracy": True,
                     "loss": False, "flip_rate": False}  # fmt: skip
TaskLoss = Literal["answer", "candidates", "lm"]
#: The counterfactual-consistency recipe for a pretrained LM and a pool of pairs from ``icp-lens pairs``: what
#: ``icp-lens train --objective consistency --pairs FILE`` uses for every option left unset (LoRA on). The task
#: term and the pair terms both compare the answer candidates only (the answer and its alternatives), so the rest
#: of the vocabulary is left alone; the task weight ``lam`` is small because the pair pool, not the explicit-cue
#: prompts, carries the lesson; the retain term (with ``--retain``) anchors language modelling; a short,
#: early-stopped second stage pins the pool's own prompts. Chosen on a validation split carved from the
#: training professions of the SmolLM2 gender case (README, "Counterfactual pairs"): no held-out word,
#: template or evaluation prompt took part.
PAIR_RECIPE: dict[str, Any] = {
    "lam": 0.15, "task_loss": "candidates", "representation": "candidates", "lr": 5e-4, "batch_size": 16,
    "max_steps": 30, "lora": True, "lora_r": 8, "retain_weight": 1.0, "retain_batch_size": 4, "retain_tokens": 32,
    "stage2_steps": 30, "stage2_check_every": 5, "stage2_patience": 2,
}  # fmt: skip

#: ``lam`` when ``TrainConfig(lam=None)``: consistency mixes task and distance half and half
DEFAULT_LAMBDA: dict[str, float] = {name: 0.5 if name == "consistency" else 1.0 for name in OBJECTIVES}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (validated on creation; see the module docstring).

    ``lam`` weighs the objective's regulariser (``task + lam * L_inv`` for invariance,
    ``lam * task + (1 - lam) * d`` for consistency); ``None`` picks the objective's
    default (:data:`DEFAULT_LAMBDA`). ``eval_every`` / ``checkpoint_every``
    are in steps (``None``: at the end of every epoch). ``early_stopping`` names the
    validation metric to watch; training stops after ``patience`` evaluations without
    an improvement of at least ``min_delta``, and the best weights are restored.
    ``pair_fraction`` computes the pair terms (invariance, consistency, ...) on that
    share of each batch only, which makes a step cheaper. ``rescore_every`` re-scores
    the features (attribution, on the probe pairs, pruned features ablated) every N
    steps from step 0 and adds the ``rescore_top_k`` highest to the regularised set
    (union), so a shortcut that moves to other features during training is followed.

    ``pair_batch_size`` sizes the batches drawn from the trainer's ``pairs=`` pool.
    ``None`` keeps the historical behaviour: batches of ``batch_size`` cut from one token
    shape at a time (so a pool of many short shapes gives small pair batches). An int
    draws exactly that many pairs per step *across* token shapes (the last batch of a pass
    over the pool may be smaller); icp_lens never pads, so such a batch runs as one
    forward pass per shape, and each pair term is the size-weighted mean over them, i.e.
    the mean over the whole batch (InfoNCE negatives stay within a shape).

    ``retain_weight`` adds a *retain term*, ``retain_weight * KL(p_orig || p_theta)``,
    the next-token KL from the original model to the trained one, averaged over every
    position of a batch of ``retain_batch_size`` ordinary texts (the trainer's
    ``retain=`` pool, each cut to its first ``retain_tokens`` tokens). It anchors the
    model's language modelling while the pair terms push hard on a few prompts, so a
    stronger pair term need not cost perplexity. With LoRA the original is the same
    model with its adapters disabled (no copy); with full fine-tuning it is the kept
    original weights (``Trainer.base``: one frozen copy of the weights on the training
    device, no gradients or optimiser state). The original has no pruning plan applied.

    ``stage2_steps > 0`` adds a *second stage* (:func:`icp_lens.training.fit_staged`): from
    the first stage's merged weights, the same loss and retain term for at most
    ``stage2_steps`` steps on the pair pool alone, checking the flip rate of those same
    pairs every ``stage2_check_every`` steps and stopping ``stage2_patience`` checks after
    the last drop, keeping the earliest weights with the fewest flips. A wide pair pool
    teaches the rule but leaves many of its own prompts near 50/50, where small residual
    differences still flip the answer; the short second stage pins them, and stopping
    early keeps it from fitting the seen values alone (:data:`PAIR_RECIPE`).
    """

    objective: Objective = "invariance"
    lam: float | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float | None = 1.0
    dropout: float | None = None
    task_loss: TaskLoss = "answer"
    interventions: tuple[str, ...] = ("resample",)
    features_per_step: int | None = None
    divergence: Divergence = "kl"
    temperature: float = 1.0
    representation: str | None = None
    nce_temperature: float = 0.1
    extra_terms: Mapping[str, float] | None = None
    pair_fraction: float = 1.0
    pair_batch_size: int | None = None
    retain_weight: float = 0.0
    retain_batch_size: int = 8
    retain_tokens: int = 64
    jtt_upweight: float = 20.0
    groupdro_eta: float = 0.01
    prune_mode: PruneMode = "mean"
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    eval_every: int | None = None
    early_stopping: StopMetric | None = None
    patience: int = 3
    min_delta: float = 0.0
    restore_best: bool = True
    log_every: int = 10
    checkpoint_every: int | None = None
    mean_reference_size: int = 1024
    rescore_every: int | None = None
    rescore_top_k: int | None = None
    rescore_kinds: tuple[str, ...] = ("neuron", "head")
    seed: int = 0
    progress: bool = True
    stage2_steps: int = 0
    stage2_check_every: int = 5
    stage2_patience: int = 2

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {self.objective!r}; valid: {list(OBJECTIVES)}")
        if self.lam is None:
            object.__setattr__(self, "lam", DEFAULT_LAMBDA[self.objective])
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"Unknown divergence {self.divergence!r}; valid: {list(DIVERGENCES)}")
        if self.task_loss not in get_args(TaskLoss):
            raise ValueError(f"Unknown task_loss {self.task_loss!r}; valid: {list(get_args(TaskLoss))}")
        object.__setattr__(self, "interventions", tuple(self.interventions))
        bad = [i for i in self.interventions if i not in INTERVENTIONS]
        if bad or not self.interventions:
            raise ValueError(f"interventions must be a non-empty subset of {list(INTERVENTIONS)}, got {bad or '()'}")
        if self.early_stopping is not None and self.early_stopping not in STOP_METRICS:
            raise ValueError(f"Unknown early_stopping metric {self.early_stopping!r}; valid: {list(STOP_METRICS)}")
        if self.objective == "consistency" and not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"consistency uses lam * task + (1 - lam) * d: lam must be in [0, 1], got {self.lam}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "patience": self.patience,
                    "log_every": self.log_every, "lora_r": self.lora_r,
                    "stage2_check_every": self.stage2_check_every, "stage2_patience": self.stage2_patience}  # fmt: skip
        if self.stage2_steps < 0:
            raise ValueError(f"stage2_steps must be >= 0 (0: one stage), got {self.stage2_steps}")
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        object.__setattr__(self, "rescore_kinds", tuple(self.rescore_kinds))
        from icp_lens.features import FEATURE_KINDS

        bad_kinds = [k for k in self.rescore_kinds if k not in FEATURE_KINDS]
        if bad_kinds or not self.rescore_kinds:
            raise ValueError(f"rescore_kinds {list(self.rescore_kinds)}: unknown or none; valid: {list(FEATURE_KINDS)}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "features_per_step", "rescore_every",
                     "rescore_top_k", "pair_batch_size"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("lr must be > 0, weight_decay >= 0 and warmup_ratio in [0, 1)")
        if not 0.0 < self.pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be in (0, 1], got {self.pair_fraction}")
        if not (self.retain_weight >= 0.0 and self.retain_weight < float("inf")):
            raise ValueError(
                f"retain_weight must be a finite number >= 0 (0: no retain term), got {self.retain_weight}"
            )
        if self.retain_batch_size < 1:
            raise ValueError(f"retain_batch_size must be >= 1, got {self.retain_batch_size}")
        if self.retain_tokens < 2:
            raise ValueError(f"retain_tokens must be >= 2 (BOS and one predicted token), got {self.retain_tokens}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.extra_terms is not None:
            object.__setattr__(self, "extra_terms", dict(self.extra_terms))
        term_weights(self.objective, self.lam, self.extra_terms)  # validates the term names

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

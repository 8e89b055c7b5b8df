"""Invariance fine-tuning: train a model so that its output stops depending on spurious features.

Stage 2, approach 2 of intervention-based causal pruning. Pruning deletes a flagged
feature, and with it anything else the real task needed from it; training instead
makes the output invariant to interventions on the feature and keeps its capacity:

    L = L_task + lam * E_{x, f in F_spurious, I}[ D(M(x), M(x | do(f = I(f)))) ]

with ``D`` a KL (either direction), JS or cosine distance, features and interventions
sampled per step. Siblings: counterfactual consistency over pairs ``(x, x_cf)`` that
change only the spurious attribute, contrastive (InfoNCE) invariance, and a *hybrid*
that prunes the extreme features and regularises the moderate ones. Baselines run in the
same loop, so tables compare like with like: ERM (with weight decay / dropout), JTT,
GroupDRO (needs group labels), counterfactual data augmentation (CDA) and
counterfactual logit pairing (CLP)::

    from icp_lens.pruning import hybrid_split
    from icp_lens.training import TrainConfig, Trainer

    split = hybrid_split(table, prune_top_k=2, regularise_top_k=8)
    trainer = Trainer(model_dir, "train.jsonl", TrainConfig(objective="invariance", lora=True),
                      features=split.regularise, prune=split.prune, val="val.jsonl")
    result = trainer.fit()               # result.history: loss terms and validation metrics
    trainer.export("debiased/")          # LoRA merged, plan baked in, verified

Modules: :mod:`~icp_lens.training.losses` (pure loss functions),
:mod:`~icp_lens.training.objectives` (one step's terms per objective),
:mod:`~icp_lens.training.forward` (one step's forward passes: stacked reference, branched
fast path), :mod:`~icp_lens.training.branch` (the hooks that branch the intervened rows
off the clean ones), :mod:`~icp_lens.training.data` (tokenized, shuffled batches),
:mod:`~icp_lens.training.config` (``TrainConfig``),
:mod:`~icp_lens.training.trainer` (building a trainer; ``Trainer`` gathers the rest):
:mod:`~icp_lens.training.loop` (``fit``, ``train_step``),
:mod:`~icp_lens.training.selection` (evaluation, early stopping),
:mod:`~icp_lens.training.rescoring` (following a moving shortcut),
:mod:`~icp_lens.training.resume` (save / restore a run),
:mod:`~icp_lens.training.export` (LoRA merge, verified HF checkpoint),
:mod:`~icp_lens.training.result` (``TrainResult``), :mod:`~icp_lens.training.run`
(``train()``), :mod:`~icp_lens.training.evaluate` (validation metrics),
:mod:`~icp_lens.training.checkpoint` (the checkpoint files),
:mod:`~icp_lens.training.lora` (peft helpers),
:mod:`~icp_lens.training.fused` (fused qkv weights vs the bridge's split copies).
"""

from icp_lens.training.config import DEFAULT_LAMBDA, PAIR_RECIPE, STOP_METRICS, TrainConfig
from icp_lens.training.data import TrainBatch, TrainData
from icp_lens.training.evaluate import evaluate_data
from icp_lens.training.losses import (
    DIVERGENCES,
    Divergence,
    answer_cross_entropy,
    consistency_loss,
    divergence,
    group_dro_update,
    info_nce,
    invariance_loss,
    jtt_weights,
    lm_loss,
    logit_pairing,
)
from icp_lens.training.objectives import INTERVENTIONS, OBJECTIVES, BatchLoss, Objective, term_weights
from icp_lens.training.staged import chain_results, fit_staged
from icp_lens.training.trainer import Trainer, TrainResult, train

__all__ = [
    "PAIR_RECIPE",
    "chain_results",
    "fit_staged",
    "DEFAULT_LAMBDA",
    "DIVERGENCES",
    "INTERVENTIONS",
    "OBJECTIVES",
    "STOP_METRICS",
    "BatchLoss",
    "Divergence",
    "Objective",
    "TrainBatch",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "Trainer",
    "answer_cross_entropy",
    "consistency_loss",
    "divergence",
    "evaluate_data",
    "group_dro_update",
    "info_nce",
    "invariance_loss",
    "jtt_weights",
    "lm_loss",
    "logit_pairing",
    "term_weights",
    "train",
]

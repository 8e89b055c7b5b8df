"""Validation metrics of a model on training-format data, computed from the trainer's own batches."""

from __future__ import annotations

from typing import Any

import torch

from icp_lens.training.data import TrainData

__all__ = ["evaluate_data"]


@torch.no_grad()
def evaluate_data(model: Any, data: TrainData, *, batch_size: int = 256) -> dict[str, float | None]:
    """Accuracy (argmax over answer + alternatives), worst-group accuracy, answer loss, flip rate.

    ``counterfactual_accuracy`` is the accuracy over the examples that have a spurious
    counterfactual *and* their counterfactuals (same answer): a model that follows the
    spurious attribute scores about 0.5 on it, so it selects models without group labels.
    """
    from icp_lens.training.losses import answer_cross_entropy, candidate_logits

    was_training = model.training
    model.eval()
    correct, loss, groups, flips, cf_hits = [], [], [], [], []
    try:
        for b in data.batches(batch_size):
            last = model(b.tokens)[:, -1]
            pred = candidate_logits(last, b.candidates).argmax(-1)
            correct.append(pred == 0)
            loss.append(answer_cross_entropy(last, b.answer, reduction="none"))
            groups.append(b.group_id)
            if b.spurious is not None:
                pred_cf = candidate_logits(model(b.spurious)[:, -1], b.candidates).argmax(-1)
                flips.append(pred_cf != pred)
                cf_hits += [pred == 0, pred_cf == 0]
    finally:
        model.train(was_training)
    hit = torch.cat(correct).float().cpu()
    gid = torch.cat(groups).cpu()
    group_acc = [hit[gid == g].mean().item() for g in range(len(data.groups)) if (gid == g).any()]
    return {
        "accuracy": hit.mean().item(),
        "worst_group_accuracy": min(group_acc) if group_acc else None,
        "loss": torch.cat(loss).mean().item(),
        "flip_rate": torch.cat(flips).float().mean().item() if flips else None,
        "counterfactual_accuracy": torch.cat(cf_hits).float().mean().item() if cf_hits else None,
    }

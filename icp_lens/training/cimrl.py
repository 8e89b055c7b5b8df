"""The loss terms of causally-informed multimodal representation learning (CIMRL).

CIMRL fights shortcuts that cross modalities (Waterbirds: the background decides, not
the bird) with three terms on top of the task loss, combined as
``L = L_task + omega_1 L_inv + omega_2 L_dis + omega_3 L_int``:

1. **Contrastive invariance** ``L_inv``: the representation of an input and of its
   *targeted perturbation* (the spurious attribute changed, e.g. the background
   swapped) must pick each other out of the batch: InfoNCE
   (:func:`icp_lens.training.losses.info_nce`, reused as is).
2. **Modality disentanglement** ``L_dis`` (:func:`disentanglement_loss`): a
   representation per modality (image-specific ``z_v``, text-specific ``z_t``) and a
   shared one ``z_s``, each with a classification head; the cross-entropy of each head
   and a penalty that keeps the specific and shared representations orthogonal::

       L_dis = alpha CE(h_v(z_v), y) + beta CE(h_t(z_t), y) + gamma CE(h_s(z_s), y)
               + lambda (orth(z_v, z_s) + orth(z_t, z_s))

   with ``orth(a, b) = || a_hat^T b_hat ||_F^2 / n`` over the ``n`` rows of the batch,
   ``a_hat`` the rows scaled to unit length: the squared Frobenius norm of the
   cross-correlation of the two representations' features over the batch (the
   difference loss of domain separation networks, Bousmalis et al. 2016), 0 when no
   feature of one co-varies with a feature of the other.
3. **Intervention-based fine-tuning** ``L_int`` (:func:`attribution_counterfactual`,
   :func:`intervention_loss`): input gradients tell which input features the model
   leans on; features whose mean absolute gradient is larger on the examples it gets
   wrong than on those it gets right are the suspects (no group labels needed). The
   counterfactual ``x_cf = x + delta`` replaces those features by their values in another
   example of the batch (``delta = x_perm - x`` on the suspects, 0 elsewhere), and
   ``L_int = KL(p(y | x) || p(y | x_cf))`` asks the prediction not to move.

All functions are pure and work in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "orthogonality_penalty",
    "disentanglement_loss",
    "attribution_mask",
    "attribution_counterfactual",
    "intervention_loss",
]


def orthogonality_penalty(a: Float[Tensor, "n d"], b: Float[Tensor, "n d2"], *, eps: float = 1e-8) -> Tensor:
    """``|| a_hat^T b_hat ||_F^2 / n``: 0 when ``sum_i a_hat_i b_hat_i^T = 0`` (no feature co-varies).

    Rows are scaled to unit length first, so the penalty does not reward shrinking the
    representations; ``a_hat^T b_hat`` is the features' cross-correlation over the ``n``
    rows (the difference loss of domain separation networks).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        shapes = f"{tuple(a.shape)}, {tuple(b.shape)}"
        raise ValueError(f"orthogonality_penalty takes [n, d] tensors with one n, got {shapes}")
    a_hat = a.float() / a.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    b_hat = b.float() / b.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    return (a_hat.T @ b_hat).pow(2).sum() / a.shape[0]


def disentanglement_loss(
    logits_vision: Float[Tensor, "n k"],
    logits_text: Float[Tensor, "n k"],
    logits_shared: Float[Tensor, "n k"],
    z_vision: Float[Tensor, "n d"],
    z_text: Float[Tensor, "n d"],
    z_shared: Float[Tensor, "n d"],
    labels: Int[Tensor, " n"],
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    lam: float = 0.1,
) -> dict[str, Tensor]:
    """The modality-disentanglement terms and their weighted sum (key ``"total"``).

    ``logits_*`` are the per-modality and shared heads' class logits, ``z_*`` the
    representations they read; returns ``{"vision", "text", "shared", "orthogonality",
    "total"}`` with ``total = alpha vision + beta text + gamma shared + lam orthogonality``.
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("lam", lam)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    terms = {
        "vision": F.cross_entropy(logits_vision.float(), labels),
        "text": F.cross_entropy(logits_text.float(), labels),
        "shared": F.cross_entropy(logits_shared.float(), labels),
        "orthogonality": orthogonality_penalty(z_vision, z_shared) + orthogonality_penalty(z_text, z_shared),
    }
    terms["total"] = (
        alpha * terms["vision"] + beta * terms["text"] + gamma * terms["shared"] + lam * terms["orthogonality"]
    )
    return terms


def attribution_mask(
    grads: Float[Tensor, "n ..."], correct: Bool[Tensor, " n"], *, fraction: float = 0.25
) -> Bool[Tensor, " ..."]:
    """The input features the model leans on more when it is wrong: the suspects.

    ``score_j = mean_{wrong} |g_j| - mean_{right} |g_j|`` (``g`` the input gradient of
    each example's loss); the top ``fraction`` of features by score are ``True``. With no
    wrong (or no right) example in the batch the mean over all examples stands in, so
    the mask picks the features with the largest attribution overall.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if grads.shape[0] != correct.shape[0]:
        raise ValueError(f"{grads.shape[0]} gradients but {correct.shape[0]} correctness flags")
    size = grads.abs().float()
    every = size.mean(0)
    wrong = size[~correct].mean(0) if (~correct).any() else every
    right = size[correct].mean(0) if correct.any() and (~correct).any() else torch.zeros_like(every)
    score = (wrong - right).flatten()
    k = max(1, round(fraction * score.numel()))
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[score.topk(k).indices] = True
    return mask.view(every.shape)


def attribution_counterfactual(
    x: Float[Tensor, "n ..."], mask: Bool[Tensor, " ..."], *, generator: torch.Generator | None = None
) -> Float[Tensor, "n ..."]:
    """``x + delta``: the masked features take their values in another example of the batch.

    The partner of each row is a random permutation without fixed points (row ``i`` never
    keeps its own values while another row exists); ``delta`` is 0 off the mask.
    """
    n = x.shape[0]
    if n < 2:
        return x.clone()
    shift = int(torch.randint(1, n, (1,), generator=generator, device="cpu").item())
    order = torch.randperm(n, generator=generator, device="cpu")
    partner = torch.empty_like(order)
    partner[order] = order.roll(shift)
    delta = (x[partner.to(x.device)] - x) * mask.to(x.device)
    return x + delta


def intervention_loss(logits: Float[Tensor, "n k"], logits_cf: Float[Tensor, "n k"]) -> Tensor:
    """``KL(p(y | x) || p(y | x_cf))``, mean over the batch (the prediction must not move)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(logits_cf.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

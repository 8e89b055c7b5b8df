"""Loss functions for invariance fine-tuning: pure functions of logits and representations.

Nothing here runs a model; :mod:`icp_lens.training.objectives` runs the forward passes and
calls these. Every function returns one number per example (``reduction="none"``) or
their mean, so the trainer can weight examples (JTT) or groups (GroupDRO).

*Task losses.* Classification as next-token prediction: ``answer_cross_entropy`` is the
cross-entropy of the answer token at the last prompt position (over the whole vocabulary,
or over the answer and its alternatives when ``candidates`` are given); ``lm_loss`` is
plain next-token cross-entropy over every position.

*Distances between two outputs* (``divergence(a, b, kind)``, per example):

==============  ======================================================  ==================
kind            value                                                   inputs
==============  ======================================================  ==================
``kl``          ``KL(softmax(a) || softmax(b))``                        logits
``reverse_kl``  ``KL(softmax(b) || softmax(a))``                        logits
``js``          ``(KL(P || M) + KL(Q || M)) / 2``, ``M = (P + Q) / 2``  logits
``cosine``      ``1 - cos(a, b)``                                       any vectors
``mse``         ``mean((a - b)^2)`` over the last dimension             any vectors
==============  ======================================================  ==================

*Invariance* ``L_inv = E_{x, f, I}[D(M(x), M(x | do(f = I(f))))]`` is ``divergence`` of the
clean and the intervened outputs (``invariance_loss``); *counterfactual consistency* over
pairs ``(x, x_cf)`` that differ only in the spurious attribute is
``lam * L_task + (1 - lam) * D(f(x), f(x_cf))`` (``consistency_loss``); *contrastive
invariance* is InfoNCE between the representation of ``x`` and of its perturbed version,
the other batch items being the negatives (``info_nce``). The baselines' pieces are
here too: counterfactual logit pairing (``logit_pairing``, Kannan et al. 2018 / Garg et
al. 2019), the GroupDRO group weights (``group_dro_update``, Sagawa et al. 2020) and the
JTT example weights (``jtt_weights``, Liu et al. 2021).

*Retain term.* ``retain_kl(reference, logits)`` is ``KL(p_ref || p_theta)`` of the
next-token distributions at every position of ordinary text, averaged over positions
and rows: 0 while the model still computes what the original (``reference``) did, and
the price, in nats per token, of every change the other terms made to language
modelling. Forward KL from the original puts its weight where the original is
confident, which is what perplexity on such text measures.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "Divergence",
    "DIVERGENCES",
    "Reduction",
    "answer_cross_entropy",
    "lm_loss",
    "divergence",
    "invariance_loss",
    "consistency_loss",
    "info_nce",
    "logit_pairing",
    "candidate_logits",
    "weighted_mean",
    "group_losses",
    "group_dro_update",
    "jtt_weights",
    "retain_kl",
]

Divergence = Literal["kl", "reverse_kl", "js", "cosine", "mse"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
Reduction = Literal["mean", "none"]


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def candidate_logits(
    logits: Float[Tensor, "batch vocab"], candidates: Int[Tensor, "batch n"]
) -> Float[Tensor, "batch n"]:
    """The logits of each row's candidate tokens; ``-1`` entries (padding) become ``-inf``."""
    if candidates.shape[0] != logits.shape[0]:
        raise ValueError(f"candidates have {candidates.shape[0]} rows, logits {logits.shape[0]}")
    picked = logits.gather(-1, candidates.clamp_min(0))
    return picked.masked_fill(candidates < 0, float("-inf"))


def answer_cross_entropy(
    logits: Float[Tensor, "batch vocab"],
    answer: Int[Tensor, " batch"],
    *,
    candidates: Int[Tensor, "batch n"] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross-entropy of ``answer`` under ``logits`` (the last prompt position).

    With ``candidates`` (``[batch, n]`` token ids, ``-1`` = padding, the answer among
    them) the softmax runs over the candidates only: a classification loss over the
    answer and its alternatives.
    """
    if logits.dim() != 2:
        raise ValueError(f"answer_cross_entropy takes [batch, vocab] logits, got shape {tuple(logits.shape)}")
    if candidates is None:
        return _reduce(F.cross_entropy(logits.float(), answer, reduction="none"), reduction)
    hits = candidates == answer[:, None]
    if not bool(hits.any(-1).all()):
        raise ValueError("every row's answer must be among its candidates")
    sub = candidate_logits(logits.float(), candidates)
    return _reduce(F.cross_entropy(sub, hits.float().argmax(-1), reduction="none"), reduction)


def lm_loss(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    *,
    answer: Int[Tensor, " batch"] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Plain next-token loss: position ``p`` predicts token ``p + 1``, averaged per example.

    With ``answer``, the last position predicts it too (the loss of ``prompt + answer``
    from one forward pass over the prompt).
    """
    targets = tokens[:, 1:]
    if answer is not None:
        targets = torch.cat([targets, answer[:, None]], dim=1)
    else:
        logits = logits[:, :-1]
    if targets.shape[1] == 0:
        raise ValueError("lm_loss needs at least two tokens (or an answer)")
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return _reduce(per_token.mean(-1), reduction)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P || Q)`` along the last dimension, from log-probabilities (0 log 0 = 0)."""
    return (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1)


def divergence(
    a: Float[Tensor, "batch d"],
    b: Float[Tensor, "batch d"],
    kind: Divergence = "kl",
    *,
    temperature: float = 1.0,
    reduction: Reduction = "none",
) -> Tensor:
    """Distance between two outputs per example; see the module docstring for ``kind``.

    ``kl``, ``reverse_kl`` and ``js`` read ``a`` and ``b`` as logits (softmax over the
    last dimension, divided by ``temperature`` first); ``cosine`` and ``mse`` take any
    vectors. Inputs of more than two dimensions are flattened after the first.
    """
    if a.shape != b.shape:
        raise ValueError(f"divergence of tensors with shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if kind not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {kind!r}; valid: {list(DIVERGENCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a, b = a.float().flatten(1), b.float().flatten(1)
    if kind in ("kl", "reverse_kl", "js"):
        log_p = F.log_softmax(a / temperature, -1)
        log_q = F.log_softmax(b / temperature, -1)
        if kind == "kl":
            value = _kl(log_p, log_q)
        elif kind == "reverse_kl":
            value = _kl(log_q, log_p)
        else:
            log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
            value = 0.5 * (_kl(log_p, log_m) + _kl(log_q, log_m))
    elif kind == "cosine":
        value = 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)
    else:
        value = (a - b).pow(2).mean(-1)
    return _reduce(value, reduction)


def invariance_loss(
    clean: Float[Tensor, "batch d"],
    edited: Float[Tensor, "batch d"] | list[Tensor],
    kind: Divergence = "kl",
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """``D(M(x), M(x | do(f = I(f))))``, averaged over several interventions when ``edited`` is a list."""
    runs = edited if isinstance(edited, list) else [edited]
    if not runs:
        raise ValueError("invariance_loss needs at least one intervened output")
    values = torch.stack([divergence(clean, e, kind, temperature=temperature) for e in runs]).mean(0)
    return _reduce(values, reduction)


def consistency_loss(
    task: Tensor,
    clean: Float[Tensor, "batch d"],
    counterfactual: Float[Tensor, "batch d"],
    lam: float,
    kind: Divergence = "kl",
    *,
    temperature: float = 1.0,
) -> Tensor:
    """``lam * task + (1 - lam) * mean D(f(x), f(x_cf))``; ``task`` is the (mean) task loss."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] for counterfactual consistency, got {lam}")
    distance = divergence(clean, counterfactual, kind, temperature=temperature, reduction="mean")
    return lam * task + (1.0 - lam) * distance


def info_nce(
    z: Float[Tensor, "batch d"],
    z_positive: Float[Tensor, "batch d"],
    *,
    temperature: float = 0.1,
    symmetric: bool = False,
    reduction: Reduction = "mean",
    targets: Int[Tensor, " batch"] | None = None,
) -> Tensor:
    """InfoNCE: row ``i`` of ``z`` must pick row ``i`` of ``z_positive`` among all rows.

    Similarities are cosine similarities divided by ``temperature``; the other batch
    items are the negatives. ``symmetric`` averages both directions (z -> z_positive and
    back), as in SimCLR/CLIP. ``targets`` (not with ``symmetric``) names row ``i``'s
    positive among the rows of a ``z_positive`` that may hold more rows than ``z``: one
    rank's anchors against the positives of the whole batch, under data parallelism.
    """
    if targets is not None:
        if symmetric or z.dim() != 2 or z_positive.dim() != 2 or z.shape[1] != z_positive.shape[1]:
            raise ValueError(f"info_nce with targets takes [batch, d] anchors and [rows, d] positives (not symmetric), "
                             f"got {tuple(z.shape)} and {tuple(z_positive.shape)}")  # fmt: skip
        if targets.shape != (z.shape[0],):
            raise ValueError(f"targets of shape {tuple(targets.shape)} for {z.shape[0]} anchors")
    elif z.shape != z_positive.shape or z.dim() != 2:
        raise ValueError(f"info_nce takes two [batch, d] tensors, got {tuple(z.shape)} and {tuple(z_positive.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sim = F.normalize(z.float(), dim=-1) @ F.normalize(z_positive.float(), dim=-1).T / temperature
    if targets is None:
        targets = torch.arange(z.shape[0], device=z.device)
    loss = F.cross_entropy(sim, targets, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(sim.T, targets, reduction="none"))
    return _reduce(loss, reduction)


def logit_pairing(a: Float[Tensor, "batch n"], b: Float[Tensor, "batch n"], *, reduction: Reduction = "mean") -> Tensor:
    """Counterfactual logit pairing: mean squared difference of two logit vectors per example."""
    if a.shape != b.shape:
        raise ValueError(f"logit_pairing of tensors with shapes {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a.float() - b.float()).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # -inf padding on both sides
    return _reduce(diff.pow(2).mean(-1), reduction)


def weighted_mean(values: Float[Tensor, " batch"], weights: Float[Tensor, " batch"] | None) -> Tensor:
    """``sum(w * v) / sum(w)`` (the plain mean without weights)."""
    if weights is None:
        return values.mean()
    if weights.shape != values.shape:
        raise ValueError(f"weights of shape {tuple(weights.shape)} for values of shape {tuple(values.shape)}")
    total = weights.sum()
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return (values * weights).sum() / total


def group_sums(
    values: Float[Tensor, " batch"], group_ids: Int[Tensor, " batch"], n_groups: int
) -> tuple[Float[Tensor, " n_groups"], Float[Tensor, " n_groups"]]:
    """Sum of ``values`` and number of examples in each group (group id ``-1``: no group, ignored)."""
    if (group_ids >= n_groups).any():
        raise ValueError(f"group ids must be < n_groups={n_groups}")
    valid = group_ids >= 0
    ids = group_ids[valid]
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(0, ids, values[valid])
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(
        0, ids, torch.ones_like(values[valid])
    )
    return sums, counts


def group_losses(
    values: Float[Tensor, " batch"], group_ids: Int[Tensor, " batch"], n_groups: int
) -> tuple[Float[Tensor, " n_groups"], Tensor]:
    """Mean loss of each group in the batch and which groups are present (``[n_groups]`` bool).

    Absent groups get loss 0. Examples with group id ``-1`` (no group) are ignored.
    """
    sums, counts = group_sums(values, group_ids, n_groups)
    return sums / counts.clamp_min(1.0), counts > 0


def group_dro_update(
    q: Float[Tensor, " n_groups"], losses: Float[Tensor, " n_groups"], present: Tensor, *, eta: float
) -> Float[Tensor, " n_groups"]:
    """One exponentiated-gradient step of the GroupDRO weights: ``q_g *= exp(eta * loss_g)``, renormalised.

    Groups absent from the batch keep their weight before renormalisation. The returned
    weights are detached; the GroupDRO loss is ``(q * losses).sum()``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    step = torch.where(present, eta * losses.detach(), torch.zeros_like(losses))
    new = q.detach() * torch.exp(step)
    return new / new.sum()


def jtt_weights(errors: Tensor, upweight: float) -> Float[Tensor, " n"]:
    """JTT example weights: ``upweight`` for the examples the identification model got wrong, else 1."""
    if upweight < 1:
        raise ValueError(f"upweight must be >= 1, got {upweight}")
    high, one = torch.tensor(float(upweight), device=errors.device), torch.tensor(1.0, device=errors.device)
    return torch.where(errors.bool(), high, one)


def retain_kl(
    reference: Float[Tensor, "batch pos vocab"],
    logits: Float[Tensor, "batch pos vocab"],
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` per position, averaged per row (``"none"``) or overall.

    ``reference`` are the original model's logits (no gradient needed), ``logits`` the
    trained model's on the same tokens; both ``[batch, pos, vocab]``.
    """
    if reference.shape != logits.shape or logits.ndim != 3:
        raise ValueError(
            f"retain_kl needs two [batch, pos, vocab] tensors of one shape, got {tuple(reference.shape)} "
            f"and {tuple(logits.shape)}"
        )
    log_p = F.log_softmax(reference.float(), -1)
    log_q = F.log_softmax(logits.float(), -1)
    return _reduce(_kl(log_p, log_q).mean(-1), reduction)

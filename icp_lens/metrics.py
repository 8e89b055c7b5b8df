"""Metrics: pure functions from next-token logits to one number per probe example.

The output property ``P`` of the method is measured at the last prompt position. Every
metric has the signature ``metric(logits, batch, clean) -> [batch]`` where ``logits`` are
the last-position logits of the run being measured (``[batch, vocab]``), ``batch`` the
``ProbeBatch`` (answers, alternatives, groups) and ``clean`` the last-position logits of
the unpatched run (only metrics comparing with the clean output, like KL, read it).

* ``logit_diff``: ``logit(answer) - mean(logit(alternatives))``; positive means right.
* ``answer_prob``: probability of the answer over the whole vocabulary.
* ``kl_to_clean``: ``KL(p_clean || p)``, how far the output moved.
* ``token_gap(a, b)``: ``logit(a) - logit(b)`` for two fixed tokens, e.g. the pronoun
  gap ``logit(" she") - logit(" he")`` whatever the example's answer.

``get_metric(name)`` resolves a name, and users pass their own function with the same
signature wherever a metric is taken.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from icp_lens.probeset import ProbeBatch

__all__ = ["Metric", "METRICS", "logit_diff", "answer_prob", "kl_to_clean", "token_gap", "get_metric"]

Metric = Callable[[Float[Tensor, "batch vocab"], ProbeBatch, "Float[Tensor, 'batch vocab'] | None"], Tensor]


def logit_diff(
    logits: Float[Tensor, "batch vocab"], batch: ProbeBatch, clean: Float[Tensor, "batch vocab"] | None = None
) -> Float[Tensor, " batch"]:
    """``logit(answer) - mean over alternatives of logit(alternative)``."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    answer = logits[rows, batch.answer]
    alts = batch.alternatives.to(logits.device)
    valid = alts >= 0
    alt_logits = logits.gather(1, alts.clamp(min=0)) * valid
    return answer - alt_logits.sum(1) / valid.sum(1)


def answer_prob(
    logits: Float[Tensor, "batch vocab"], batch: ProbeBatch, clean: Float[Tensor, "batch vocab"] | None = None
) -> Float[Tensor, " batch"]:
    """Probability of the answer token (softmax over the whole vocabulary)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits.float().softmax(-1)[rows, batch.answer]


def kl_to_clean(
    logits: Float[Tensor, "batch vocab"], batch: ProbeBatch, clean: Float[Tensor, "batch vocab"] | None = None
) -> Float[Tensor, " batch"]:
    """``KL(p_clean || p)`` in nats; zero on the clean run itself."""
    if clean is None:
        raise ValueError("kl_to_clean needs the clean logits")
    log_p = logits.float().log_softmax(-1)
    log_q = clean.float().log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def token_gap(token_a: int, token_b: int) -> Metric:
    """A metric ``logit(token_a) - logit(token_b)`` (e.g. the she/he pronoun gap)."""

    def gap(
        logits: Float[Tensor, "batch vocab"], batch: ProbeBatch, clean: Float[Tensor, "batch vocab"] | None = None
    ) -> Float[Tensor, " batch"]:
        return logits[:, token_a] - logits[:, token_b]

    gap.__name__ = f"token_gap({token_a},{token_b})"
    return gap


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "answer_prob": answer_prob, "kl": kl_to_clean}


def get_metric(metric: str | Metric) -> Metric:
    """A metric by name (``logit_diff``, ``answer_prob``, ``kl``) or a user's function as is."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; valid: {sorted(METRICS)} or a function (logits, batch, clean)")
    return METRICS[metric]

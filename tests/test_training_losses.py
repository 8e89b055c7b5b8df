"""The training losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from icp_lens.training import losses as L
from icp_lens.training.objectives import term_weights

LN3 = math.log(3.0)


def close(value, expected, tol=1e-6) -> None:
    assert float(value) == pytest.approx(expected, abs=tol)


def test_answer_cross_entropy_full_vocab_and_candidates() -> None:
    logits = torch.tensor([[0.0, LN3, 0.0]])  # softmax = [1/5, 3/5, 1/5]
    close(L.answer_cross_entropy(logits, torch.tensor([1])), -math.log(3 / 5))
    # over the candidates {1, 0} only: softmax([ln 3, 0]) = [3/4, 1/4]
    close(L.answer_cross_entropy(logits, torch.tensor([1]), candidates=torch.tensor([[1, 0]])), -math.log(3 / 4))
    # padding (-1) is ignored; the answer need not come first
    close(L.answer_cross_entropy(logits, torch.tensor([1]), candidates=torch.tensor([[0, 1, -1]])), -math.log(3 / 4))
    per = L.answer_cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3]), reduction="none")
    assert per.shape == (2,) and torch.allclose(per, torch.full((2,), math.log(4)))
    with pytest.raises(ValueError, match="among its candidates"):
        L.answer_cross_entropy(logits, torch.tensor([2]), candidates=torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="\\[batch, vocab\\]"):
        L.answer_cross_entropy(torch.zeros(1, 2, 3), torch.tensor([0]))


def test_lm_loss() -> None:
    tokens = torch.tensor([[0, 1, 2]])
    close(L.lm_loss(torch.zeros(1, 3, 5), tokens), math.log(5))  # uniform: ln V per token
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 4] = 100.0  # predicts 1, 2, then 4
    close(L.lm_loss(logits, tokens), 0.0)  # positions 0, 1 predict tokens 1, 2
    close(L.lm_loss(logits, tokens, answer=torch.tensor([4])), 0.0)  # the last predicts the answer
    close(L.lm_loss(logits, tokens, answer=torch.tensor([3])), 100.0 / 3, tol=1e-3)


def test_divergences_by_hand() -> None:
    a = torch.tensor([[0.0, LN3]])  # P = [1/4, 3/4]
    b = torch.tensor([[0.0, 0.0]])  # Q = [1/2, 1/2]
    kl_pq = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl_qp = 0.5 * math.log(2.0) + 0.5 * math.log(2 / 3)
    m = [3 / 8, 5 / 8]
    js = 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    close(L.divergence(a, b, "kl")[0], kl_pq)
    close(L.divergence(a, b, "reverse_kl")[0], kl_qp)
    close(L.divergence(a, b, "js")[0], js)
    close(L.divergence(a, b, "js")[0], float(L.divergence(b, a, "js")[0]))  # symmetric
    close(L.divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), "cosine")[0], 1.0)
    close(L.divergence(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]]), "cosine")[0], 0.0)
    close(L.divergence(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]]), "mse")[0], 2.0)
    # temperature 2 halves the logits: P = softmax([0, ln 3 / 2]) = [1, sqrt 3] / (1 + sqrt 3)
    p = [1 / (1 + 3**0.5), 3**0.5 / (1 + 3**0.5)]
    close(L.divergence(a, b, "kl", temperature=2.0)[0], p[0] * math.log(2 * p[0]) + p[1] * math.log(2 * p[1]))
    x = torch.randn(4, 7)
    assert torch.allclose(L.divergence(x, x, "kl"), torch.zeros(4), atol=1e-6)
    assert L.divergence(x, x.flip(0), "kl", reduction="mean").ndim == 0
    with pytest.raises(ValueError, match="Unknown divergence 'l2'"):
        L.divergence(a, b, "l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes"):
        L.divergence(a, torch.zeros(1, 3))


def test_kl_gradient_reaches_both_outputs() -> None:
    clean = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    edited = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    L.invariance_loss(clean, edited).backward()
    assert clean.grad.abs().sum() > 0 and edited.grad.abs().sum() > 0


def test_invariance_loss_averages_interventions() -> None:
    clean, e1, e2 = torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, LN3]])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    close(L.invariance_loss(clean, e1), kl)
    close(L.invariance_loss(clean, [e1, e2]), kl / 2)  # the second run changes nothing
    with pytest.raises(ValueError, match="at least one"):
        L.invariance_loss(clean, [])


def test_consistency_loss() -> None:
    x, x_cf = torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    close(L.consistency_loss(torch.tensor(2.0), x, x_cf, 0.25), 0.25 * 2.0 + 0.75 * kl)
    close(L.consistency_loss(torch.tensor(2.0), x, x_cf, 1.0), 2.0)
    with pytest.raises(ValueError, match="lam must be in \\[0, 1\\]"):
        L.consistency_loss(torch.tensor(2.0), x, x_cf, 1.5)


def test_info_nce() -> None:
    eye = torch.eye(2)
    # similarities [[1, 0], [0, 1]] at temperature 1: loss = log(1 + e^-1) per row
    close(L.info_nce(eye, eye, temperature=1.0), math.log(1 + math.exp(-1)))
    close(L.info_nce(eye, eye, temperature=1.0, symmetric=True), math.log(1 + math.exp(-1)))
    # swapped positives: each row's positive is the orthogonal one: log(1 + e^1)
    close(L.info_nce(eye, eye.flip(0), temperature=1.0), math.log(1 + math.e))
    # cosine similarity: scale does not matter; lower temperature sharpens
    close(L.info_nce(3 * eye, eye, temperature=0.5), math.log(1 + math.exp(-2)))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.info_nce(eye, eye, temperature=0.0)
    # one rank's anchors against every row's positives (data parallelism): row 1 of eye(3) picks row 1
    # among three positives, 1 similar and 2 orthogonal: log(1 + 2 e^-1); the mean of rows 0 and 2 of the
    # whole batch's loss is that of those anchors with their targets
    eye3 = torch.eye(3)
    close(L.info_nce(eye3[1:2], eye3, temperature=1.0, targets=torch.tensor([1])), math.log(1 + 2 * math.exp(-1)))
    whole = L.info_nce(eye3 + 0.3, eye3, temperature=0.7, reduction="none")
    part = L.info_nce(eye3[[0, 2]] + 0.3, eye3, temperature=0.7, targets=torch.tensor([0, 2]))
    close(part, float(whole[[0, 2]].mean()))
    with pytest.raises(ValueError, match="targets of shape"):
        L.info_nce(eye3[:2], eye3, temperature=1.0, targets=torch.tensor([0]))
    with pytest.raises(ValueError, match="not symmetric"):
        L.info_nce(eye3[:2], eye3, temperature=1.0, targets=torch.tensor([0, 1]), symmetric=True)


def test_logit_pairing_and_candidate_logits() -> None:
    close(L.logit_pairing(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])), 2.5)
    logits = torch.tensor([[5.0, 6.0, 7.0]])
    picked = L.candidate_logits(logits, torch.tensor([[2, 0, -1]]))
    assert picked[0, :2].tolist() == [7.0, 5.0] and picked[0, 2] == float("-inf")
    # -inf padding on both sides pairs to zero, not NaN
    close(L.logit_pairing(picked, L.candidate_logits(logits + 1, torch.tensor([[2, 0, -1]]))), 2 / 3)


def test_group_losses_and_group_dro_update() -> None:
    losses, present = L.group_losses(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, -1]), 3)
    assert losses.tolist() == [1.5, 3.0, 0.0] and present.tolist() == [True, True, False]
    q = L.group_dro_update(torch.tensor([0.25, 0.25, 0.5]), torch.tensor([math.log(2), 0.0, 9.0]),
                           torch.tensor([True, True, False]), eta=1.0)  # fmt: skip
    # [0.25 * 2, 0.25, 0.5 (absent: unchanged)] / 1.25
    assert torch.allclose(q, torch.tensor([0.4, 0.2, 0.4]))
    with pytest.raises(ValueError, match="group ids must be < n_groups"):
        L.group_losses(torch.ones(2), torch.tensor([0, 3]), 3)


def test_weighted_mean_and_jtt_weights() -> None:
    w = L.jtt_weights(torch.tensor([True, False, False]), 5.0)
    assert w.tolist() == [5.0, 1.0, 1.0]
    close(L.weighted_mean(torch.tensor([1.0, 2.0, 3.0]), w), (5 + 2 + 3) / 7)
    close(L.weighted_mean(torch.tensor([1.0, 2.0, 3.0]), None), 2.0)
    with pytest.raises(ValueError, match="upweight must be >= 1"):
        L.jtt_weights(torch.tensor([True]), 0.5)


def test_term_weights() -> None:
    assert term_weights("invariance", 2.0) == {"task": 1.0, "invariance": 2.0}
    assert term_weights("consistency", 0.25) == {"task": 0.25, "consistency": 0.75}
    assert term_weights("erm", 3.0) == {"task": 1.0}
    assert term_weights("invariance", 1.0, {"consistency": 0.5}) == {"task": 1.0, "invariance": 1.0, "consistency": 0.5}
    with pytest.raises(ValueError, match="Unknown objective 'dro'"):
        term_weights("dro", 1.0)
    with pytest.raises(ValueError, match="Unknown loss term 'kl'"):
        term_weights("erm", 1.0, {"kl": 1.0})

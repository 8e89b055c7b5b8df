"""CIMRL loss terms against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from icp_lens.training.cimrl import (
    attribution_counterfactual,
    attribution_mask,
    disentanglement_loss,
    intervention_loss,
    orthogonality_penalty,
)


def test_orthogonality_penalty_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # a^T b = [[1, 0], [1, 0]]: squared Frobenius norm 2, over n = 2 rows
    assert orthogonality_penalty(a, b).item() == pytest.approx(1.0)
    assert orthogonality_penalty(5 * a, 0.1 * b).item() == pytest.approx(1.0)  # scale does not matter
    # 0 when the features do not co-vary over the batch: sum_i a_i b_i^T = 0
    zero = orthogonality_penalty(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[0.0, 3.0], [0.0, 3.0]]))
    assert zero.item() == 0.0
    # rows (3, 4)/5 and (1, 0): a_hat^T b_hat = [[0.6, 0], [0.8, 0]] -> (0.36 + 0.64) / 1
    assert orthogonality_penalty(torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one n"):
        orthogonality_penalty(torch.ones(2, 3), torch.ones(3, 3))


def test_disentanglement_loss_by_hand() -> None:
    zero = torch.zeros(2, 2)
    labels = torch.tensor([0, 1])
    shared_logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p(y=0) = 3/4 on row 0
    z_v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    z_s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    weights = dict(alpha=2.0, beta=0.5, gamma=1.0, lam=0.1)
    terms = disentanglement_loss(zero, zero, shared_logits, z_v, z_t, z_s, labels, **weights)
    ce_shared = 0.5 * (-math.log(0.75) + math.log(2.0))
    assert terms["vision"].item() == pytest.approx(math.log(2.0))
    assert terms["shared"].item() == pytest.approx(ce_shared)
    # orth(z_v, z_s) = 1 (above); z_t^T z_s = [[0, 0], [2, 0]] -> 4 / 2 = 2
    assert terms["orthogonality"].item() == pytest.approx(3.0)
    expected = 2.0 * math.log(2.0) + 0.5 * math.log(2.0) + ce_shared + 0.1 * 3.0
    assert terms["total"].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        disentanglement_loss(zero, zero, zero, z_v, z_t, z_s, labels, lam=-1.0)


def test_attribution_mask_picks_what_the_wrong_examples_lean_on() -> None:
    grads = torch.tensor([
        [1.0, 0.0, 2.0],
        [1.0, 0.0, -2.0],   # right: mean |g| = (1, 0, 2)
        [0.0, -4.0, 1.0],
        [0.0, 2.0, 1.0],    # wrong: mean |g| = (0, 3, 1)
    ])  # fmt: skip
    correct = torch.tensor([True, True, False, False])
    # scores wrong - right = (-1, 3, -1): feature 1 alone at fraction 1/3; then ties keep two
    assert attribution_mask(grads, correct, fraction=1 / 3).tolist() == [False, True, False]
    assert attribution_mask(grads, correct, fraction=1.0).tolist() == [True, True, True]
    # all right: the largest mean |g| overall, (0.5, 1.5, 1.5) -> one of the two largest
    picked = attribution_mask(grads, torch.ones(4, dtype=torch.bool), fraction=1 / 3)
    assert picked.sum() == 1 and not picked[0]
    assert attribution_mask(torch.randn(4, 2, 3), correct, fraction=0.5).shape == (2, 3)
    with pytest.raises(ValueError, match="fraction must be in"):
        attribution_mask(grads, correct, fraction=0.0)


def test_attribution_counterfactual_moves_only_the_masked_features() -> None:
    x = torch.arange(12.0).view(4, 3)
    mask = torch.tensor([False, True, False])
    cf = attribution_counterfactual(x, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cf[:, [0, 2]], x[:, [0, 2]])
    assert sorted(cf[:, 1].tolist()) == sorted(x[:, 1].tolist())  # values of other rows...
    assert (cf[:, 1] != x[:, 1]).all()  # ...never a row's own
    assert torch.equal(attribution_counterfactual(x[:1], mask), x[:1])


def test_intervention_loss_by_hand() -> None:
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(3.0), 0.0]])  # (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert intervention_loss(p, q).item() == pytest.approx(expected)
    assert intervention_loss(q, q).item() == pytest.approx(0.0, abs=1e-7)

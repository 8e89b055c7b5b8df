from __future__ import annotations

import math

import pytest
import torch

from icp_lens.metrics import answer_prob, get_metric, kl_to_clean, logit_diff, token_gap
from icp_lens.probeset import ProbeBatch


def batch() -> ProbeBatch:
    return ProbeBatch(
        index=torch.tensor([0, 1]),
        tokens=torch.zeros(2, 3, dtype=torch.long),
        answer=torch.tensor([0, 2]),
        alternatives=torch.tensor([[1, 2], [0, -1]]),
        spurious=None,
        causal=None,
        causal_answer=None,
        groups=(None, None),
    )


LOGITS = torch.tensor([[2.0, 0.0, 1.0], [0.0, 5.0, 3.0]])


def test_logit_diff_against_hand_values() -> None:
    # row 0: 2 - mean(0, 1) = 1.5; row 1: 3 - 0 = 3 (the -1 padding is ignored)
    assert logit_diff(LOGITS, batch()).tolist() == [1.5, 3.0]


def test_answer_prob_and_kl_against_hand_values() -> None:
    z0 = math.exp(2) + 1 + math.exp(1)
    assert answer_prob(LOGITS, batch())[0].item() == pytest.approx(math.exp(2) / z0, rel=1e-6)
    assert kl_to_clean(LOGITS, batch(), LOGITS).abs().max().item() < 1e-6
    p = torch.tensor([0.5, 0.5])
    q_logits = torch.tensor([[0.0, math.log(3.0)]])  # q = (0.25, 0.75)
    kl = kl_to_clean(q_logits, batch(), torch.zeros(1, 2))[0].item()
    assert kl == pytest.approx(float((p * (p / torch.tensor([0.25, 0.75])).log()).sum()), rel=1e-6)
    with pytest.raises(ValueError, match="needs the clean logits"):
        kl_to_clean(LOGITS, batch(), None)


def test_token_gap_and_lookup() -> None:
    assert token_gap(1, 2)(LOGITS, batch()).tolist() == [-1.0, 2.0]
    assert get_metric("logit_diff") is logit_diff
    custom = lambda logits, b, clean: logits[:, 0]  # noqa: E731
    assert get_metric(custom) is custom
    with pytest.raises(ValueError, match=r"valid: \['answer_prob', 'kl', 'logit_diff'\]"):
        get_metric("accuracy")

"""Input-level audit: how much does the model use an attribute, and how spurious is it?

Two measures, one per question.

**Sensitivity** (does the model use the attribute?). For probes ``x`` with a
counterfactual ``x'`` that changes one attribute,
``S = E[d(f(x), f(x'))]`` with ``d`` the KL divergence between the next-token
distributions restricted to the answer candidates, and the *flip rate*: the share of
probes whose preferred candidate changes. Measured for the spurious counterfactuals and
the causal ones; the **causal robustness ratio** is ``S_causal / S_spurious`` (large:
the model follows the cause, not the shortcut).

**Spuriousness ratio** (should it be used?). On labelled data with a discrete
spurious attribute ``X_S``, a discrete causal attribute ``X_C`` and the label ``Y``::

    rho = (I(X_S; Y) - I(X_S; Y | X_C)) / I(X_S; Y)

the share of the attribute's information about the label that the cause explains
away: 1 when ``X_S`` predicts ``Y`` only through ``X_C`` (a pure shortcut: the
correlation disappears once the cause is known), 0 when ``X_S`` carries information
the cause does not. Mutual information is the plug-in estimate (in nats) from the
empirical joint table, with a bootstrap percentile interval.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "mutual_information",
    "conditional_mutual_information",
    "SpuriousnessRatio",
    "spuriousness_ratio",
    "sensitivity",
]


def _codes(values: Sequence[Hashable]) -> np.ndarray:
    return pd.factorize(pd.Series(list(values), dtype=object))[0]


def _mi(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    p = joint / n
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())


def mutual_information(x: Sequence[Hashable], y: Sequence[Hashable]) -> float:
    """Plug-in ``I(X; Y)`` in nats from paired discrete samples."""
    if len(x) != len(y) or not len(x):
        raise ValueError("mutual_information needs two non-empty sequences of the same length")
    return _mi(_codes(x), _codes(y))


def conditional_mutual_information(x: Sequence[Hashable], y: Sequence[Hashable], z: Sequence[Hashable]) -> float:
    """Plug-in ``I(X; Y | Z) = sum_z p(z) I(X; Y | Z = z)`` in nats."""
    if not len(x) == len(y) == len(z) or not len(x):
        raise ValueError("conditional_mutual_information needs three non-empty sequences of the same length")
    xc, yc, zc = _codes(x), _codes(y), _codes(z)
    total = 0.0
    for value in np.unique(zc):
        mask = zc == value
        total += mask.mean() * _mi(_codes(xc[mask]), _codes(yc[mask]))
    return total


@dataclass(frozen=True)
class SpuriousnessRatio:
    """``rho`` with its parts and a bootstrap interval."""

    rho: float
    mi: float
    conditional_mi: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("rho", "mi", "conditional_mi", "ci_low", "ci_high", "n")}


def _rho(xs: np.ndarray, y: np.ndarray, xc: np.ndarray) -> tuple[float, float, float]:
    mi = _mi(_codes(xs), _codes(y))
    cmi = conditional_mutual_information(xs, y, xc)
    return (float("nan") if mi <= 0 else (mi - cmi) / mi), mi, cmi


def spuriousness_ratio(
    spurious: Sequence[Hashable],
    label: Sequence[Hashable],
    causal: Sequence[Hashable],
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> SpuriousnessRatio:
    """``rho = (I(X_S;Y) - I(X_S;Y|X_C)) / I(X_S;Y)`` with a 95% bootstrap interval (NaN when I(X_S;Y) = 0)."""
    xs, y, xc = _codes(spurious), _codes(label), _codes(causal)
    if not len(xs) == len(y) == len(xc) or not len(xs):
        raise ValueError("spuriousness_ratio needs three non-empty sequences of the same length")
    rho, mi, cmi = _rho(xs, y, xc)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(len(xs), size=len(xs))
        r = _rho(xs[idx], y[idx], xc[idx])[0]
        if np.isfinite(r):
            boots.append(r)
    low, high = np.percentile(boots, [2.5, 97.5]).tolist() if boots else [float("nan")] * 2
    return SpuriousnessRatio(rho=rho, mi=mi, conditional_mi=cmi, ci_low=low, ci_high=high, n=len(xs))


@torch.no_grad()
def sensitivity(model: Any, tokenizer: Any, probes: Sequence[Any], *, batch_size: int = 32) -> pd.DataFrame:
    """Sensitivity to the spurious and the causal counterfactuals of ``probes`` (a tidy frame).

    One row per counterfactual kind (``spurious``, ``causal``) with ``kl`` (mean KL of the
    candidate distribution, prompt vs counterfactual), ``flip_rate``, ``n``, and the
    ``causal_robustness`` ratio ``kl_causal / kl_spurious`` on both rows. Works on an HF
    causal LM or a ``TransformerBridge`` (prompts tokenized as the model's tooling does).
    """
    from icp_lens.encoding import encode_texts
    from icp_lens.probes import single_token_id

    def candidate_logprobs(texts: list[str], cands: list[list[int]]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [torch.empty(0, device="cpu")] * len(texts)
        encoded = encode_texts(texts, model=model, tokenizer=tokenizer)
        device = next(model.parameters()).device
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_len.setdefault(len(ids), []).append(i)
        for idxs in by_len.values():
            for start in range(0, len(idxs), batch_size):
                chunk = idxs[start : start + batch_size]
                res = model(torch.tensor([encoded[i] for i in chunk], device=device))
                last = (res.logits if hasattr(res, "logits") else res)[:, -1].float().cpu()
                for row, i in enumerate(chunk):
                    out[i] = torch.log_softmax(last[row, cands[i]], -1)
        return out

    rows = []
    for kind, field in (("spurious", "spurious_counterfactual"), ("causal", "causal_counterfactual")):
        chosen = [p for p in probes if getattr(p, field, None)]
        if not chosen:
            continue
        cands = [[single_token_id(tokenizer, a) for a in (p.answer, *p.alternatives)] for p in chosen]
        base = candidate_logprobs([p.prompt for p in chosen], cands)
        other = candidate_logprobs([getattr(p, field) for p in chosen], cands)
        kl = [float((a.exp() * (a - b)).sum()) for a, b in zip(base, other, strict=True)]
        flips = [int(a.argmax()) != int(b.argmax()) for a, b in zip(base, other, strict=True)]
        rows.append(
            {"counterfactual": kind, "kl": float(np.mean(kl)), "flip_rate": float(np.mean(flips)), "n": len(chosen)}
        )
    frame = pd.DataFrame(rows, columns=["counterfactual", "kl", "flip_rate", "n"])
    if set(frame["counterfactual"]) == {"spurious", "causal"}:
        kl = dict(zip(frame["counterfactual"], frame["kl"], strict=True))
        frame["causal_robustness"] = kl["causal"] / kl["spurious"] if kl["spurious"] > 0 else float("inf")
    return frame

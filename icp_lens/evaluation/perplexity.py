"""Perplexity on held-out text: what a mitigation costs the language model.

Pruning features changes more than the behaviour it targets. The standard price tag is
the perplexity on ordinary text the intervention never saw,

    PPL = exp( - sum_{t} log p(w_t | w_<t) / N ),

over every scored token of every text (``N`` of them). Texts are encoded with BOS first
(so the first word is scored too) and cut to their first ``max_tokens`` tokens: a fixed
budget per text keeps the cost predictable and lets texts of equal length share a
forward pass (no padding ever enters one; see :mod:`icp_lens.encoding`). Compare two
models on the same texts and budget; the absolute number depends on both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icp_lens.encoding import bos_first, length_batches

__all__ = ["PerplexityResult", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity`` = exp(``nll``), ``nll`` the mean negative log-likelihood (nats/token).

    ``n_texts`` texts, ``n_tokens`` scored tokens; ``per_text_nll`` is each text's mean.
    """

    perplexity: float
    nll: float
    n_texts: int
    n_tokens: int
    per_text_nll: tuple[float, ...]

    def to_dict(self) -> dict[str, float | int]:
        """The summary numbers (without the per-text values)."""
        return {"perplexity": self.perplexity, "nll": self.nll, "n_texts": self.n_texts, "n_tokens": self.n_tokens}


def _encode(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    encoded = bos_first(tokenizer, texts, purpose="perplexity (the first word is scored after BOS)")
    for i, row in enumerate(encoded):
        if len(row) < 2:
            raise ValueError(f"text {i} encodes to no tokens")
    return [row[:max_tokens] for row in encoded]


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 16,
) -> PerplexityResult:
    """Token-level perplexity of ``model`` on ``texts`` (each cut to ``max_tokens`` tokens, BOS included).

    ``model``: an HF causal LM (its ``.logits``), a ``TransformerBridge`` or a
    ``HookedTransformer`` (logits returned directly); run in whatever train/eval mode it
    is in (evaluate a model in eval mode).
    """
    if not texts:
        raise ValueError("perplexity needs at least one text")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (BOS and one scored token), got {max_tokens}")
    encoded = _encode(tokenizer, texts, max_tokens)
    device = next(model.parameters()).device
    total = np.zeros(len(encoded))
    count = np.zeros(len(encoded), dtype=int)
    for idx, tokens in length_batches(encoded, batch_size, device=device):
        if tokens.shape[1] < 2:
            continue
        out = model(tokens)
        logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        total[idx] = nll.double().sum(1).cpu().numpy()
        count[idx] = tokens.shape[1] - 1
    if count.sum() == 0:
        raise ValueError("no text has a token to score after BOS")
    nll = float(total.sum() / count.sum())
    per_text = tuple(float(t / c) if c else float("nan") for t, c in zip(total, count, strict=True))
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, n_texts=len(texts), n_tokens=int(count.sum()), per_text_nll=per_text
    )

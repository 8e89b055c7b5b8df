"""Pair bias: does the model find the stereotypical sentence of a minimal pair likelier?

CrowS-Pairs (Nangia et al. 2020) pairs a *more* stereotypical sentence with a *less*
stereotypical one that differs only in the group mentioned ("Women can't drive" /
"Men can't drive"). A causal LM scores a sentence by its log-likelihood,

    log p(w_1 .. w_T) = sum_t log p(w_t | w_<t),

the sum of next-token log-probabilities over its tokens. The pair bias score is the
share of pairs in which the more stereotypical sentence gets the higher score
(:func:`icp_lens.evaluation.metrics.pair_bias_score`; a tie counts one half): 0.5 is
unbiased, above 0.5 the model prefers the stereotype. (The original metric scores masked
LMs by pseudo-log-likelihood of the shared tokens; for causal LMs the full-sentence
log-likelihood is the usual form.)

BOS: the first token has no prediction unless something precedes it. Sentences are
encoded the way the model's own tooling does (``model.to_tokens`` for a bridge or
``HookedTransformer``: BOS per ``cfg.default_prepend_bos``; else the tokenizer with its
special tokens) and every token after the first is scored. ``prepend_bos=True``
ensures the tokenizer's BOS comes first, so the first word is scored too;
``prepend_bos=False`` removes a leading BOS. A sentence left with no token to score is an
error. Sentences are batched by token length, so no padding enters a forward pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int

from icp_lens.encoding import encode_texts
from icp_lens.evaluation.metrics import bootstrap_ci, pair_bias_score

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PairBiasResult", "sentence_loglik", "pair_bias"]


def _encode_sentences(
    model: Any, tokenizer: Any, sentences: Sequence[str], prepend_bos: bool | None
) -> list[list[int]]:
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("pass the tokenizer: the model has no .tokenizer")
    encoded = encode_texts(list(sentences), model=model, tokenizer=tok)
    if prepend_bos is not None:
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            raise ValueError("prepend_bos was given but the tokenizer has no bos_token_id")
        has = [len(ids) > 0 and ids[0] == bos for ids in encoded]
        if prepend_bos:
            encoded = [ids if h else [bos, *ids] for ids, h in zip(encoded, has, strict=True)]
        else:
            encoded = [ids[1:] if h else ids for ids, h in zip(encoded, has, strict=True)]
    for sentence, ids in zip(sentences, encoded, strict=True):
        if len(ids) < 2:
            raise ValueError(
                f"sentence {sentence!r} encodes to {len(ids)} token(s) {ids}: nothing to score; "
                "pass prepend_bos=True to score the first token after BOS"
            )
    return encoded


@torch.no_grad()
def _logliks(
    model: Any, tokenizer: Any, sentences: Sequence[str], batch_size: int, prepend_bos: bool | None
) -> tuple[Float[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """Summed log-probs and number of scored tokens of each sentence."""
    if not sentences:
        raise ValueError("sentence_loglik needs at least one sentence")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = _encode_sentences(model, tokenizer, sentences, prepend_bos)
    device = next(model.parameters()).device
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    total = np.zeros(len(sentences))
    for idxs in by_len.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            out = model(ids)
            logits = (out.logits if hasattr(out, "logits") else out).float()
            logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            total[chunk] = logp.sum(-1).double().cpu().numpy()
    return total, np.array([len(ids) - 1 for ids in encoded])


def sentence_loglik(
    model: Any,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    prepend_bos: bool | None = None,
) -> Float[np.ndarray, " n"]:
    """``sum_t log p(w_t | w_<t)`` of each sentence (nats), every token after the first.

    ``prepend_bos``: ``None`` encodes as the model does; ``True`` makes BOS the first
    token (so the first word is scored); ``False`` drops a leading BOS.
    """
    return _logliks(model, tokenizer, sentences, batch_size, prepend_bos)[0]


@dataclass(frozen=True, eq=False)
class PairBiasResult:
    """Pair bias score (share of pairs preferring the stereotype, 0.5 = unbiased) and pairs.

    ``pairs`` has one row per pair: ``more, less, loglik_more, loglik_less, n_tokens_more,
    n_tokens_less, prefers_more`` (1, 0, or 0.5 for a tie).
    """

    score: float
    n: int
    ci_low: float
    ci_high: float
    pairs: pd.DataFrame

    def to_dict(self) -> dict[str, float | int]:
        """The score, its bootstrap interval and the number of pairs."""
        return {"pair_bias_score": self.score, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def pair_bias(
    model: Any,
    tokenizer: Any,
    more: Sequence[str],
    less: Sequence[str],
    *,
    batch_size: int = 64,
    prepend_bos: bool | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> PairBiasResult:
    """CrowS-Pairs-style bias of ``model`` on pairs ``(more[i], less[i])``.

    ``more[i]`` is the more stereotypical sentence of pair ``i``. Both lists are scored
    in one call to :func:`sentence_loglik`; the interval is a seeded percentile
    bootstrap over pairs.
    """
    import pandas as pd

    if len(more) != len(less):
        raise ValueError(f"more and less must pair up, got {len(more)} and {len(less)} sentences")
    if not more:
        raise ValueError("pair_bias needs at least one pair")
    loglik, n_tokens = _logliks(model, tokenizer, [*more, *less], batch_size, prepend_bos)
    n = len(more)
    lm, ll = loglik[:n], loglik[n:]
    prefers = (lm > ll) + 0.5 * (lm == ll)
    pairs = pd.DataFrame(
        {
            "more": list(more),
            "less": list(less),
            "loglik_more": lm,
            "loglik_less": ll,
            "n_tokens_more": n_tokens[:n],
            "n_tokens_less": n_tokens[n:],
            "prefers_more": prefers,
        }
    )
    low, high = bootstrap_ci(prefers, n_boot=n_boot, seed=seed)
    return PairBiasResult(score=pair_bias_score(lm, ll), n=n, ci_low=low, ci_high=high, pairs=pairs)

"""Next-token margins: how much a model prefers each probe example's answer, from one forward pass.

:func:`next_token_margins` reads the logits at the last position of each prompt and returns
``logit(answer) - mean logit(alternatives)``: positive when the answer beats the
alternatives on average, the signed quantity a stereotype gap or a she-vs-he preference is
made of. (:class:`~icp_lens.evaluation.predictions.Predictions` keeps the margin against
the *best* alternative instead.) Prompts are encoded BOS first (``tokenizer.bos_token_id``
then the text without special tokens, :func:`icp_lens.encoding.bos_first`), as a bridge
encodes them, so a bridge and the HF model it wraps give the same numbers to float
round-off. Any causal LM works: an HF model, a ``TransformerBridge``, a ``HookedTransformer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from icp_lens.encoding import bos_first, length_batches
from icp_lens.probes import ProbeExample, single_token_id

__all__ = ["next_token_margins"]


@torch.no_grad()
def next_token_margins(
    model: Any, tokenizer: Any, examples: Sequence[ProbeExample], *, batch_size: int = 64
) -> Float[np.ndarray, " n"]:
    """``logit(answer) - mean logit(alternatives)`` at the last position of each prompt (BOS first)."""
    if not examples:
        raise ValueError("next_token_margins needs at least one example")
    encoded = bos_first(tokenizer, [ex.prompt for ex in examples], purpose="next_token_margins")
    ids: dict[str, int] = {}

    def tid(text: str) -> int:
        if text not in ids:
            ids[text] = single_token_id(tokenizer, text)
        return ids[text]

    device = next(model.parameters()).device
    out = np.zeros(len(examples))
    for idx, tokens in length_batches(encoded, batch_size, device=device):
        result = model(tokens)
        last = (result.logits if hasattr(result, "logits") else result)[:, -1].double()
        for row, i in enumerate(idx):
            ex = examples[i]
            alts = [tid(a) for a in ex.alternatives]
            out[i] = float(last[row, tid(ex.answer)] - last[row, alts].mean())
    return out

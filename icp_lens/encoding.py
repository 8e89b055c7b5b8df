"""Token ids for lists of texts, batched by length so that no padding is ever involved.

icp_lens compares activations and logits position by position, so it never pads:
texts are encoded the way the model's own tooling does it (``model.to_tokens`` for a
``TransformerBridge`` or ``HookedTransformer``, which prepends BOS per
``cfg.default_prepend_bos``; ``tokenizer(text)`` with special tokens for a plain HF
model), then grouped by token length.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["bos_first", "encode_texts", "length_batches"]


def encode_texts(texts: Sequence[str], *, model: Any = None, tokenizer: Any = None) -> list[list[int]]:
    """Token ids of ``texts``: ``model.to_tokens`` when the model has it, else ``tokenizer``."""
    if not texts:
        return []
    if model is not None and hasattr(model, "to_tokens"):
        return [model.to_tokens(t)[0].tolist() for t in texts]
    if tokenizer is None:
        raise ValueError("encode_texts needs a model with to_tokens (bridge, HookedTransformer) or a tokenizer")
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def bos_first(tokenizer: Any, texts: Sequence[str], *, purpose: str = "this measure") -> list[list[int]]:
    """``[bos, *ids]`` for each text: the tokenizer's BOS, then the text without special tokens.

    Whatever the tokenizer adds by default, the first word then has a prediction to score
    and a bridge (``to_tokens`` with BOS) sees the same ids. ``purpose`` names the caller
    in the error raised when the tokenizer has no BOS.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(f"{purpose} encodes texts BOS first, but the tokenizer has no bos_token_id")
    return [[bos, *ids] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def length_batches(
    encoded: Sequence[Sequence[int]], batch_size: int = 32, *, device: torch.device | str | None = None
) -> Iterator[tuple[list[int], Int[Tensor, "batch pos"]]]:
    """``(indices, tokens)`` batches of equal-length sequences, in order of first appearance."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        if len(ids) == 0:
            raise ValueError(f"Text {i} encodes to no tokens")
        by_len[len(ids)].append(i)
    for idxs in by_len.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            yield chunk, torch.tensor([list(encoded[i]) for i in chunk], device=device)

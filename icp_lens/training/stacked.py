"""The reference forward pass of a training step: row blocks stacked along the batch.

:class:`~icp_lens.training.objectives.BatchLoss` names the row *blocks* a step needs
(``x``, ``a``, ``cf``, and ``do``, the intervened copy of the anchor rows).
:func:`stacked_forward` concatenates the blocks of one token length and runs them in one
pass, the edits hitting the ``do`` rows only: rows never interact in a transformer, so
one pass equals separate runs. It is what the fast paths of
:mod:`icp_lens.training.forward` are checked against; ``_passes`` / ``_split`` (the row
bookkeeping) and ``_run`` are shared with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace

import torch
from torch import Tensor

from icp_lens.edits import Edit, intervene
from icp_lens.hooks import capturing
from icp_lens.model import HookedModel

__all__ = ["Outputs", "stacked_forward"]

#: ``block -> (logits, last-position logits, captured representation or None)``
Outputs = dict[str, tuple[Tensor, Tensor, Tensor | None]]


def _passes(blocks: list[tuple[str, Tensor]]) -> list[tuple[Tensor, dict[str, tuple[int, int]]]]:
    """Blocks grouped by token length: one ``(stacked tokens, block -> row span)`` per pass."""
    by_len: dict[int, list[tuple[str, Tensor]]] = {}
    for name, tokens in blocks:
        by_len.setdefault(tokens.shape[1], []).append((name, tokens))
    passes = []
    for members in by_len.values():
        spans, start = {}, 0
        for name, tokens in members:
            spans[name] = (start, start + tokens.shape[0])
            start += tokens.shape[0]
        passes.append((torch.cat([t for _, t in members]), spans))
    return passes


def _split(logits: Tensor, captured: Tensor | None, spans: dict[str, tuple[int, int]], out: Outputs) -> None:
    for name, (lo, hi) in spans.items():
        out[name] = (logits[lo:hi], logits[lo:hi, -1], None if captured is None else captured[lo:hi])


def _run(model: HookedModel, tokens: Tensor, last_only: bool) -> Tensor:
    """The model's logits; with ``last_only`` only the last position's (``[batch, 1, vocab]``)."""
    return model(tokens, logits_to_keep=1) if last_only else model(tokens)


def stacked_forward(
    model: HookedModel,
    blocks: list[tuple[str, Tensor]],
    edits: Sequence[Edit],
    rep_hook: str | None = None,
    *,
    last_only: bool = False,
) -> Outputs:
    """The reference: run the blocks stacked along the batch (one pass per token length).

    ``edits`` (rows relative to the block) hit block ``"do"``; ``rep_hook`` is a hook
    point whose activation is captured (with gradient) as each block's representation.
    ``last_only`` unembeds the last position only (a bridge's ``logits_to_keep=1``): the
    returned logits are then ``[rows, 1, vocab]``.
    """
    out: Outputs = {}
    for tokens, spans in _passes(blocks):
        pass_edits = [replace(e, rows=spans["do"]) for e in edits] if "do" in spans else []
        with ExitStack() as stack:
            stack.enter_context(intervene(model, pass_edits))
            store = stack.enter_context(capturing(model, [rep_hook] if rep_hook else [], detach=False))
            logits = _run(model, tokens, last_only)
            captured = store.get(rep_hook) if rep_hook else None
        _split(logits, captured, spans, out)
    return out

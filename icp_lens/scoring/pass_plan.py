"""How the exact scorer lays out its work: which features share a patched pass, and where a pass may start.

``_plan`` chunks features by block (a pass runs blocks ``L..`` for all its features);
``_first_change`` is the first position an intervention can change; ``_tile`` and
``_in_columns`` reshape a probe batch for a packed pass and for answer-column logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from itertools import groupby

import torch
from torch import Tensor

from icp_lens.features import Feature
from icp_lens.probeset import ProbeBatch


def _tile(batch: ProbeBatch, k: int) -> ProbeBatch:
    """The batch repeated ``k`` times along the batch dimension (what a packed pass computes on)."""

    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))

    return replace(
        batch,
        index=rep(batch.index),
        tokens=rep(batch.tokens),
        answer=rep(batch.answer),
        alternatives=rep(batch.alternatives),
        spurious=rep(batch.spurious),
        causal=rep(batch.causal),
        causal_answer=rep(batch.causal_answer),
        groups=batch.groups * k,
    )


def _in_columns(batch: ProbeBatch, columns: Tensor) -> ProbeBatch:
    """``batch`` with answer and alternatives as indices into ``columns`` (which holds them all)."""
    lookup = torch.full((int(columns.max()) + 1,), -1, dtype=torch.long, device=columns.device)
    lookup[columns] = torch.arange(len(columns), device=columns.device)
    alts = batch.alternatives
    return replace(
        batch, answer=lookup[batch.answer], alternatives=torch.where(alts >= 0, lookup[alts.clamp(min=0)], -1)
    )


def _last_only(feature: Feature, n_layers: int) -> bool:
    """Whether only the last position of ``feature`` can move the last position's logits.

    Neurons and head outputs of the last block feed only their own position (no later
    attention reads them); value vectors and residual dimensions are read by attention.
    """
    return feature.layer == n_layers - 1 and feature.kind in ("neuron", "head", "query")


def _plan(
    features: Sequence[Feature], per_pass: int, n_layers: int, overhead: float = 0.0
) -> list[tuple[int, list[int], bool]]:
    """Chunks of at most ``per_pass`` feature indices in layer order: ``(first layer, indices, last_only)``.

    A chunk's pass runs blocks ``first layer..`` for all its features, so a feature of a
    later block in it pays for blocks it cannot change; every pass also costs about
    ``overhead`` features' worth of work in each block it runs. The chunks minimise
    ``sum((n_layers - first layer) * (len(chunk) + overhead))``: the features of one block
    fill whole chunks of their own, and the rest (fewer than ``per_pass`` per block) are
    split where starting a new pass costs less than carrying them through earlier blocks.
    Last-block features read only at the last position (``_last_only``) get chunks of
    their own. ``overhead=0``: one block per chunk (except for the size cap); ``inf``
    (passes that run every block anyway): consecutive chunks of ``per_pass``.
    """
    key = {i: (features[i].layer, _last_only(features[i], n_layers)) for i in range(len(features))}
    order = sorted(range(len(features)), key=key.__getitem__)
    if math.isinf(overhead):
        return _chunks([order[s : s + per_pass] for s in range(0, len(order), per_pass)], features, key)
    chunks: list[list[int]] = []
    rest: list[int] = []  # what is left of each block's features after its full chunks
    for _, group_iter in groupby(order, key=key.__getitem__):
        group = list(group_iter)
        full = len(group) - len(group) % per_pass
        chunks += [group[s : s + per_pass] for s in range(0, full, per_pass)]
        rest += group[full:]
    depth = [n_layers - features[i].layer for i in rest]
    last = [key[i][1] for i in rest]  # sorted: last-only features come at the end
    best, cut = [0.0] + [math.inf] * len(rest), [0] * (len(rest) + 1)
    for i in range(1, len(rest) + 1):
        for j in range(max(0, i - per_pass), i):
            if last[j] == last[i - 1] and (cost := best[j] + depth[j] * (i - j + overhead)) < best[i]:
                best[i], cut[i] = cost, j
    i = len(rest)
    while i > 0:
        chunks.append(rest[cut[i] : i])
        i = cut[i]
    return _chunks(sorted(chunks, key=lambda c: key[c[0]]), features, key)


def _chunks(
    chunks: list[list[int]], features: Sequence[Feature], key: dict[int, tuple[int, bool]]
) -> list[tuple[int, list[int], bool]]:
    return [(features[c[0]].layer, c, all(key[i][1] for i in c)) for c in chunks]


def _cf_positions(positions: tuple[int, ...] | None, seq_len: int, src_len: int) -> tuple[int, ...] | None:
    """Positions to patch when the counterfactual is right-aligned and shorter than the prompt."""
    if src_len >= seq_len:
        return positions
    wanted = range(seq_len) if positions is None else [p % seq_len for p in positions]
    return tuple(p - seq_len for p in wanted if p >= seq_len - src_len)


def _first_change(tokens: Tensor, cf: Tensor | None, positions: tuple[int, ...] | None, last_only: bool = False) -> int:
    """The first position where an intervention can change what the metric reads (``seq_len``: none).

    A resample changes nothing before the first token where prompt and counterfactual
    differ (activations there are equal in both runs); ``last_only`` features matter only
    at the last position; ``positions`` limits it further.
    """
    seq = tokens.shape[1]
    first = seq - 1 if last_only else 0
    if cf is not None:
        changed = (tokens != cf).any(0).nonzero()
        first = max(first, int(changed[0]) if changed.numel() else seq)
    if positions is not None:
        wanted = [p % seq for p in positions if p % seq >= first]
        first = min(wanted) if wanted else seq
    return first

"""The gap between two groups' mean score: how far a spurious attribute moves a model's output.

A shortcut shows up as a difference of means. Give every probe example one number (its
answer-minus-alternative logit margin, :func:`~icp_lens.evaluation.margins.next_token_margins`)
and a group named after the spurious value it carries ("female-stereotyped" vs
"male-stereotyped" professions, a source tag, a first name's origin). When every example
asks the *same* question (e.g. " she" vs " he" after a profession), an unbiased model has
the same mean margin in both groups, and :func:`group_gap` (mean of ``high`` minus mean of
``low``) is 0. A mitigation's "gap cut" is ``1 - after.gap / before.gap`` on held-out
prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from icp_lens.probes import ProbeExample

__all__ = ["GroupGap", "group_gap"]


@dataclass(frozen=True)
class GroupGap:
    """``gap = high_mean - low_mean`` over the examples of groups ``high`` and ``low``."""

    gap: float
    high: str
    low: str
    high_mean: float
    low_mean: float
    n_high: int
    n_low: int

    def __float__(self) -> float:
        return self.gap


def group_gap(values: Any, groups: Sequence[str | ProbeExample | None], high: str, low: str) -> GroupGap:
    """Mean of ``values`` over group ``high`` minus the mean over group ``low``.

    ``values``: one number per example (a list, numpy array or 1-D tensor). ``groups``:
    the examples' groups, as strings or as the ``ProbeExample`` objects themselves.
    Examples of other groups are ignored; both groups must be present.
    """
    if hasattr(values, "detach"):
        values = values.detach().float().cpu()
    numbers = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    labels = [g.group if isinstance(g, ProbeExample) else g for g in groups]
    if len(numbers) != len(labels):
        raise ValueError(f"{len(numbers)} values but {len(labels)} groups")
    if high == low:
        raise ValueError(f"the two groups must differ; got {high!r} twice")
    a = [v for v, g in zip(numbers, labels, strict=True) if g == high]
    b = [v for v, g in zip(numbers, labels, strict=True) if g == low]
    if not a or not b:
        present = sorted({str(g) for g in labels})
        raise ValueError(f"group_gap needs examples of both groups {high!r} and {low!r}; the groups present: {present}")
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    return GroupGap(
        gap=mean_a - mean_b, high=high, low=low, high_mean=mean_a, low_mean=mean_b, n_high=len(a), n_low=len(b)
    )

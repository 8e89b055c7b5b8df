"""Choose a keyed edit's setting by cross-validation over the spurious values, on the pairs alone.

A keyed edit (:mod:`icp_lens.keyed_edit`) has two settings that decide what it does: which
MLP layers it edits and how hard the retain text holds the rest of the model in place
(``retain_weight``). Measured on one validation split, every setting looked alike (the
SmolLM2 gender case moved its four validation professions by at most 17% whatever the
setting), so the choice among near-ties was noise. Cross-validation spends the same pairs
better and asks the question a user cares about: *does the edit generalise to spurious
values it was not fitted on?*

* **Folds over values** (``by="value"``, the default): the distinct spurious values that
  the prompts carry (the words where a prompt and its counterfactual differ: "nurse",
  "mechanic", a reviewer's name) are dealt, group by group, into ``n_folds`` folds. Each
  fold's edit is fitted on the pairs that touch *none* of the fold's values (neither the
  prompt's nor the counterfactual's), and measured on the pairs whose prompt carries one
  of them. With only a few values (a two-word tag) use ``by="pair"``: the prompts are
  dealt into folds instead (a weaker test: the held-out prompts share their values with
  the fitted ones).
* **What a fold measures**: the *spurious shift*, ``mean |m(x') - m(x)|`` over the fold's
  pairs, ``m`` the answer's margin over its alternatives after the prompt ``x`` and after
  its spurious counterfactual ``x'`` (both read with the prompt's answer), and its
  ``cut = 1 - shift_after / shift_before``; the accuracy on the fold's share of the
  ``guard`` examples (the explicit cue, dealt into folds too, so it is measured on prompts
  the edit did not guard); the perplexity rise on ``ppl_texts`` (text the edit did not
  retain).
* **The rule**: among the candidates whose *worst* fold keeps the guard accuracy
  ``>= min_explicit`` and the perplexity rise ``<= max_ppl_rise``, the largest mean cut.
  No candidate passing is an answer too (``chosen`` is ``None``): the budget cannot be met
  with these candidates.

Every number comes from the pairs, the guard and the texts the user fits on: nothing held
out for the final evaluation is touched. The model is edited in place and restored after
each fit (only the edited MLP output matrices change), so no copy is made.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from icp_lens.probes import ProbeExample

__all__ = [
    "CV_BY",
    "KeyedCandidate",
    "KeyedChoice",
    "choose_keyed_edit",
    "make_folds",
    "neutral_pairs",
    "slot_words",
    "swap_values",
]

CvBy = Literal["value", "pair"]
CV_BY: tuple[str, ...] = ("value", "pair")


def slot_words(prompt: str, counterfactual: str) -> str:
    """The words of ``counterfactual`` that differ from ``prompt`` (aligned from both ends)."""
    a, b = prompt.split(), counterfactual.split()
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return " ".join(b[head : len(b) - tail])


def _clean(word: str) -> str:
    return re.sub(r"[^\w\s'-]", "", word).lower()


def swap_values(ex: ProbeExample) -> tuple[str, str]:
    """(the prompt's spurious value, the counterfactual's): the words where the two differ, lower-cased."""
    if ex.spurious_counterfactual is None:
        raise ValueError(f"probe {ex.prompt!r} has no spurious counterfactual")
    cf = ex.spurious_counterfactual
    return _clean(slot_words(cf, ex.prompt)), _clean(slot_words(ex.prompt, cf))


def neutral_pairs(pairs: Sequence[ProbeExample], neutral: Sequence[str]) -> list[ProbeExample]:
    """The pairs whose spurious counterfactual puts one of the ``neutral`` values where the prompt's value was."""
    values = {v.strip().lower() for v in neutral if v.strip()}
    if not values:
        raise ValueError("neutral_pairs needs at least one neutral value")
    return [ex for ex in pairs if ex.spurious_counterfactual is not None and swap_values(ex)[1] in values]


@dataclass(frozen=True)
class KeyedCandidate:
    """One setting to try: the layers edited (in order) and the retain weight."""

    layers: tuple[int, ...]
    retain_weight: float

    @property
    def label(self) -> str:
        return f"L{','.join(map(str, self.layers))} w{self.retain_weight:g}"


def make_folds(pairs: Sequence[ProbeExample], n_folds: int, by: str = "value") -> list[frozenset[str]]:
    """Deal the pairs' spurious values (``by="value"``) or prompts (``by="pair"``) into ``n_folds`` folds.

    Values are dealt group by group, in order of first appearance, so every fold holds
    values of every group where there are enough. Deterministic: the same pairs give the
    same folds.
    """
    if by not in CV_BY:
        raise ValueError(f"by must be one of {CV_BY}, got {by!r}")
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    items: dict[str | None, list[str]] = {}
    seen: set[str] = set()
    for ex in pairs:
        if ex.spurious_counterfactual is None:
            continue
        key = swap_values(ex)[0] if by == "value" else ex.prompt
        if key not in seen:
            seen.add(key)
            items.setdefault(ex.group, []).append(key)
    flat = [k for g in items.values() for k in g]
    if len(flat) < n_folds:
        what = "spurious values" if by == "value" else "prompts with a spurious counterfactual"
        hint = "; fewer folds, or by='pair' (--cv-by pair)" if by == "value" else "; fewer folds"
        raise ValueError(f"{n_folds} folds need at least {n_folds} {what}, found {len(flat)}: {flat[:8]}{hint}")
    folds: list[set[str]] = [set() for _ in range(n_folds)]
    i = 0
    for group in items.values():
        for key in group:
            folds[i % n_folds].add(key)
            i += 1
    return [frozenset(f) for f in folds]


@dataclass(frozen=True)
class KeyedChoice:
    """What :func:`choose_keyed_edit` measured and chose.

    ``table``: one row per candidate and fold (``layers``, ``retain_weight``, ``fold``,
    ``shift_before``, ``shift_after``, ``cut``, ``explicit``, ``ppl_rise``, ``n_fit``,
    ``n_measure``, ``seconds``); ``summary``: one row per candidate (``mean_cut``,
    ``min_cut``, ``max_cut``, ``worst_explicit``, ``worst_ppl_rise``, ``eligible``,
    ``chosen``); ``folds``: the held-out values (or prompts) of each fold; ``rule``: the
    budget; ``base``: the unedited model's explicit accuracy and perplexity.
    """

    chosen: KeyedCandidate | None
    by: str
    folds: tuple[tuple[str, ...], ...]
    rule: dict[str, float]
    base: dict[str, float]
    table: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as ``None``)."""

        def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
            rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
            return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows]

        return {
            "chosen": None if self.chosen is None else {"layers": list(self.chosen.layers),
                                                        "retain_weight": self.chosen.retain_weight},
            "by": self.by,
            "folds": [list(f) for f in self.folds],
            "rule": self.rule,
            "base": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.base.items()},
            "summary": records(self.summary),
            "table": records(self.table),
        }  # fmt: skip


def _shift(model: nn.Module, tokenizer: Any, pairs: Sequence[ProbeExample]) -> float:
    """:func:`icp_lens.evaluation.metrics.sensitivity` of the pairs: ``mean |m(x') - m(x)|``."""
    from icp_lens.evaluation.margins import next_token_margins
    from icp_lens.evaluation.metrics import sensitivity

    cfs = [ProbeExample(prompt=p.spurious_counterfactual or "", answer=p.answer, alternatives=p.alternatives)
           for p in pairs]  # fmt: skip
    with torch.no_grad():
        return sensitivity(next_token_margins(model, tokenizer, pairs), next_token_margins(model, tokenizer, cfs))


def _explicit(model: nn.Module, tokenizer: Any, examples: Sequence[ProbeExample]) -> float:
    from icp_lens.evaluation.margins import next_token_margins

    if not examples:
        return float("nan")
    with torch.no_grad():
        return float((next_token_margins(model, tokenizer, examples) > 0).mean())


def _ppl(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int) -> float:
    from icp_lens.evaluation.perplexity import perplexity

    return float(perplexity(model, tokenizer, texts, max_tokens=max_tokens).perplexity) if texts else float("nan")


def choose_keyed_edit(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[ProbeExample],
    candidates: Sequence[KeyedCandidate],
    *,
    measure_pairs: Sequence[ProbeExample] | None = None,
    guard: Sequence[ProbeExample] = (),
    retain: Sequence[str] = (),
    ppl_texts: Sequence[str] = (),
    n_folds: int = 4,
    by: str = "value",
    min_explicit: float = 0.95,
    max_ppl_rise: float = 0.03,
    target: str = "counterfactual",
    guard_weight: float = 1.0,
    rank: int | None = None,
    max_tokens: int = 128,
    done: Sequence[dict[str, Any]] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    cache_keys: bool = True,
) -> KeyedChoice:
    """Score every candidate by ``n_folds``-fold cross-validation and choose one (module docstring).

    ``cache_keys``: compute each text's MLP keys once per layer for the whole run (every
    fold edits the same unedited model, restored in between) instead of in every fold;
    ``False`` recomputes them (the same numbers, slower: the baseline of
    ``benchmarks/bench_keyed_cv.py``).

    ``pairs``: the pairs the edit is fitted on (e.g. the neutral swaps); ``measure_pairs``:
    the pairs whose spurious shift is measured (default: ``pairs``; e.g. the swaps between
    groups); the folds are made from ``measure_pairs``. ``guard``: explicit-cue examples
    (answers that legitimately depend on the attribute): fitted on outside the fold,
    measured inside it (no guard: the explicit budget is not checked). ``retain``: ordinary
    text held in place by every fit; ``ppl_texts``: other ordinary text, for the perplexity
    rise (none: not checked). ``done``: rows of an interrupted run (matched by candidate
    and fold, then skipped); ``on_row`` is called with each new row (save it there).
    ``model`` is edited and restored in place: its weights are unchanged on return.
    """
    from icp_lens.keyed_edit import KeyCache, _mlp_out, keyed_edit

    if not candidates:
        raise ValueError("choose_keyed_edit needs at least one candidate")
    measure = list(measure_pairs if measure_pairs is not None else pairs)
    measure = [p for p in measure if p.spurious_counterfactual is not None]
    folds = make_folds(measure, n_folds, by)

    def key(ex: ProbeExample) -> tuple[str, ...]:
        return swap_values(ex) if by == "value" else (ex.prompt,)

    guard_folds = [list(guard)[i::n_folds] for i in range(n_folds)]
    layers = sorted({layer for c in candidates for layer in c.layers})
    saved = {layer: _mlp_out(model, layer)[0].weight.detach().clone() for layer in layers}
    base_explicit = _explicit(model, tokenizer, list(guard))
    base_ppl = _ppl(model, tokenizer, ppl_texts, max_tokens)
    base_shift = [_shift(model, tokenizer, [p for p in measure if key(p)[0] in fold]) for fold in folds]
    finished = {(r["label"], r["fold"]): r for r in done}
    key_cache: KeyCache | None = {} if cache_keys else None  # keys of a text and layer computed once
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(candidates) * n_folds, desc="keyed edit cross-validation", disable=not progress)
    try:
        for cand in candidates:
            for i, fold in enumerate(folds):
                if (cand.label, i) in finished:
                    rows.append(finished[(cand.label, i)])
                    bar.update()
                    continue
                fit = [p for p in pairs if p.spurious_counterfactual is not None and not set(key(p)) & fold]
                held = [p for p in measure if key(p)[0] in fold]
                if not fit:
                    raise ValueError(f"fold {i} ({sorted(fold)[:6]}) leaves no pair to fit on: use fewer folds")
                fit_guard = [g.prompt for j, gf in enumerate(guard_folds) if j != i for g in gf]
                t0 = time.perf_counter()
                try:
                    keyed_edit(model, tokenizer, fit, layers=cand.layers, guard=fit_guard, retain=retain,
                               target=target, guard_weight=guard_weight, retain_weight=cand.retain_weight,
                               rank=rank, max_tokens=max_tokens, progress=False, key_cache=key_cache)  # fmt: skip
                    shift = _shift(model, tokenizer, held)
                    explicit = _explicit(model, tokenizer, guard_folds[i])
                    ppl = _ppl(model, tokenizer, ppl_texts, max_tokens)
                finally:
                    with torch.no_grad():
                        for layer, w in saved.items():
                            _mlp_out(model, layer)[0].weight.copy_(w)
                row = {
                    "label": cand.label, "layers": list(cand.layers), "retain_weight": cand.retain_weight, "fold": i,
                    "shift_before": base_shift[i], "shift_after": shift,
                    "cut": 1 - shift / base_shift[i] if base_shift[i] > 0 else float("nan"),
                    "explicit": explicit, "ppl_rise": ppl / base_ppl - 1 if _positive(base_ppl) else float("nan"),
                    "n_fit": len(fit), "n_measure": len(held), "seconds": round(time.perf_counter() - t0, 2),
                }  # fmt: skip
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                bar.update()
                bar.set_postfix_str(f"{cand.label} fold {i}: cut {row['cut']:.3f}")
    finally:
        bar.close()
    table = pd.DataFrame(rows)
    table["layers"] = table["layers"].map(lambda v: ",".join(map(str, v)))
    summary = (
        table.groupby(["label", "layers", "retain_weight"], sort=False)
        .agg(mean_cut=("cut", "mean"), min_cut=("cut", "min"), max_cut=("cut", "max"),
             worst_explicit=("explicit", "min"), worst_ppl_rise=("ppl_rise", "max"))
        .reset_index()
    )  # fmt: skip
    explicit_ok = summary.worst_explicit.isna() | (summary.worst_explicit >= min_explicit)
    ppl_ok = summary.worst_ppl_rise.isna() | (summary.worst_ppl_rise <= max_ppl_rise)
    summary["eligible"] = explicit_ok & ppl_ok & summary.mean_cut.notna()
    summary["chosen"] = False
    chosen = None
    if summary.eligible.any():
        best = summary[summary.eligible].mean_cut.idxmax()
        summary.loc[best, "chosen"] = True
        chosen = candidates[[c.label for c in candidates].index(summary.loc[best, "label"])]
    return KeyedChoice(
        chosen=chosen,
        by=by,
        folds=tuple(tuple(sorted(f)) for f in folds),
        rule={"min_explicit": min_explicit, "max_ppl_rise": max_ppl_rise},
        base={"explicit": base_explicit, "perplexity": base_ppl},
        table=table.drop(columns="label"),
        summary=summary.drop(columns="label"),
    )


def _positive(value: float) -> bool:
    return not math.isnan(value) and value > 0

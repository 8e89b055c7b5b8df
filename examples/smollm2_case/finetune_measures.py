"""What the fine-tuning experiment measures: counterfactual consistency, bias, and what it costs.

A model is *counterfactually consistent* on a pronoun probe when swapping the profession
for one of the opposite stereotype ("Yesterday the nurse wrote that" ->
"Yesterday the mechanic wrote that") leaves its she-vs-he preference alone. Two numbers
say how far a model is from that, per split of :func:`examples.smollm2_case.pronouns.pronoun_probes`
(``"train"``: the professions and templates fine-tuning saw; ``"eval"``: held-out ones):

- **flip rate**: the share of prompts whose pronoun choice (the sign of the she-minus-he
  margin) changes under the swap (:func:`icp_lens.evaluation.flip_rate`). Coarse: a
  margin that moves from +0.1 to -0.1 flips, one that moves from +3 to +0.2 does not;
- **mean |delta margin|**: ``mean |margin(x_cf) - margin(x)|``
  (:func:`icp_lens.evaluation.sensitivity`), the size of the move, 0 when consistent.

Beside them, the case study's measures (:mod:`examples.smollm2_case.measures`): the
stereotype gap per split, explicit-cue accuracy (the true cause must still work), IMDB
perplexity on the reviews the study keeps for evaluation, and optionally the Wino-style
and CrowS-Pairs gender scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from examples.smollm2_case.measures import per_profession
from examples.smollm2_case.pronouns import explicit_gender_probes, pronoun_probes, stereotype_gap
from icp_lens.data import imdb_texts
from icp_lens.evaluation import flip_rate, next_token_margins, pair_bias, perplexity, sensitivity
from icp_lens.probes import ProbeExample

__all__ = ["PAIR_SPLITS", "counterfactual_margins", "pair_shift", "finetune_measures"]

#: the pronoun-probe splits: seen in fine-tuning, held out
PAIR_SPLITS: tuple[str, ...] = ("train", "eval")


def pair_shift(margins: Sequence[float], margins_cf: Sequence[float]) -> tuple[float, float]:
    """``(flip_rate, mean |delta margin|)`` of she-minus-he margins on prompts and their counterfactuals.

    The choice is ``" she"`` where the margin is > 0, else ``" he"``; a flip is a change of
    choice between ``margins[i]`` and ``margins_cf[i]``.
    """
    m, mc = np.asarray(margins, dtype=float), np.asarray(margins_cf, dtype=float)
    if m.shape != mc.shape or m.ndim != 1:
        raise ValueError(f"margins and margins_cf must be 1-D of one length, got {m.shape} and {mc.shape}")
    choice, choice_cf = np.where(m > 0, " she", " he"), np.where(mc > 0, " she", " he")
    return flip_rate(choice, choice_cf), sensitivity(m, mc)


def counterfactual_margins(
    model: Any, tokenizer: Any, examples: Sequence[ProbeExample], *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """She-minus-he margins on each prompt and on its spurious counterfactual (same answer and alternative)."""
    missing = [ex.prompt for ex in examples if ex.spurious_counterfactual is None]
    if missing:
        raise ValueError(f"{len(missing)} examples have no spurious_counterfactual, e.g. {missing[0]!r}")
    swapped = [
        replace(ex, prompt=ex.spurious_counterfactual, spurious_counterfactual=None, causal_counterfactual=None,
                causal_answer=None)
        for ex in examples
    ]  # fmt: skip
    both = next_token_margins(model, tokenizer, [*examples, *swapped], batch_size=batch_size)
    return both[: len(examples)], both[len(examples) :]


def finetune_measures(
    model: Any,
    tokenizer: Any,
    *,
    n_imdb: int | None = 40,
    imdb_tokens: int = 128,
    n_wino: int = 0,
    n_crows: int = 0,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Every measure of one model, and its per-profession margins.

    Values: ``flip_rate_{split}``, ``abs_shift_{split}`` (mean |delta margin|),
    ``gap_{split}`` (stereotype gap) and ``explicit_accuracy_{split}`` for ``split`` in
    :data:`PAIR_SPLITS`; ``perplexity_imdb`` on the first ``n_imdb`` evaluation reviews
    (:func:`~icp_lens.data.imdb_texts`, cut to ``imdb_tokens``);
    ``wino_pro_preference`` / ``crows_gender_score`` on ``n_wino`` / ``n_crows`` pairs
    sampled with ``seed`` (NaN when 0). The frame has ``split, profession, group, margin, n``.
    """
    values: dict[str, float] = {}
    frames = []
    for split in PAIR_SPLITS:
        probes = pronoun_probes(split)  # type: ignore[arg-type]
        m, mc = counterfactual_margins(model, tokenizer, probes, batch_size=batch_size)
        values[f"flip_rate_{split}"], values[f"abs_shift_{split}"] = pair_shift(m, mc)
        values[f"gap_{split}"] = stereotype_gap(m, probes).gap
        explicit = next_token_margins(model, tokenizer, explicit_gender_probes(split), batch_size=batch_size)  # type: ignore[arg-type]
        values[f"explicit_accuracy_{split}"] = float((explicit > 0).mean())
        frames.append(per_profession(m, probes).assign(split=split))
    texts = imdb_texts("eval", n_imdb, seed=seed)
    values["perplexity_imdb"] = perplexity(model, tokenizer, texts, max_tokens=imdb_tokens).perplexity
    values["wino_pro_preference"] = values["crows_gender_score"] = float("nan")
    if n_wino or n_crows:
        from icp_lens.data import load_crows_pairs, load_wino

        for name, n, frame, more, less in (
            ("wino_pro_preference", n_wino, load_wino, "pro_sentence", "anti_sentence"),
            ("crows_gender_score", n_crows, lambda: load_crows_pairs(bias_type="gender"), "sent_more", "sent_less"),
        ):
            if n:
                rows = frame()
                rows = rows if n >= len(rows) else rows.sample(n=n, random_state=seed)
                values[name] = pair_bias(
                    model, tokenizer, list(rows[more]), list(rows[less]), prepend_bos=True, batch_size=batch_size
                ).score
    professions = pd.concat(frames, ignore_index=True)[["split", "profession", "group", "margin", "n"]]
    return values, professions

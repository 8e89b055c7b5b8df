"""Controlled substitution: counterfactuals of real sentences by swapping an attribute's words.

Templates give clean pairs but narrow ones; real text gives breadth. Here every sentence
that mentions the attribute gets a counterfactual in which each of its attribute words
is swapped for its partner in the other group, and nothing else changes.

**The swap list** is a two-column TSV whose first row names the two groups::

    female	male
    she	he
    her	his
    woman	man
    women	men

- both directions are used (``he`` -> ``she`` as well as ``she`` -> ``he``);
- matching is case-insensitive on whole words and keeps the case pattern of the word it
  replaces (``She`` -> ``He``, ``SHE`` -> ``HE``);
- regular plurals follow (``nurses`` -> ``mechanics`` from ``nurse  mechanic``) unless
  the list says otherwise; a possessive ``'s`` stays; irregular forms (``women``) need
  their own row;
- a word listed with two partners (``her`` -> ``him`` and ``his``) uses the first row
  for that direction; the report lists such words.

**Texts** come from a ``.txt`` file (one per line), ``.jsonl`` (a ``text`` field and an
optional ``label``) or ``.csv`` (a ``text``, ``sentence`` or ``review`` column and an
optional ``label``). Each becomes a probe ``prompt = text + suffix`` whose candidates are
``answers``: with labels, ``answers`` maps each label to its answer token (the label's
answer is the probe's answer, the others its alternatives, and the labelled originals
also form ``task.jsonl``); without labels, ``answers`` is a list of candidate tokens
whose distribution the consistency term compares (the first is written as the answer;
the invariance term does not use which one is right, and ``task.jsonl`` stays empty).

With ``holdout = F`` a fraction F of the swap rows and of the texts is held out:
held-out pairs are held-out texts that swap at least one held-out word; training pairs
are the other texts that swap no held-out word.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icp_lens.counterfactuals.spec import SpecError
from icp_lens.counterfactuals.templates import PairsResult, _split
from icp_lens.probes import ProbeExample

__all__ = [
    "SwapList",
    "LabelledText",
    "read_labelled_texts",
    "substitute",
    "check_answers",
    "generate_substitution_pairs",
]

_TEXT_COLUMNS = ("text", "sentence", "review")


@dataclass(frozen=True)
class SwapList:
    """Word pairs between two groups: ``rows[i] = (word of groups[0], word of groups[1])``."""

    groups: tuple[str, str]
    rows: tuple[tuple[str, str], ...]

    @classmethod
    def load(cls, path: str | Path) -> SwapList:
        """Read the TSV (first row: the two group names; ``#`` lines and blank lines skipped)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No swap list at {path}")
        groups: tuple[str, str] | None = None
        rows: list[tuple[str, str]] = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cells = [c.strip() for c in line.split("\t")]
            if len(cells) != 2 or not all(cells):
                raise SpecError(
                    f"{path}, line {lineno}: a swap row is two non-empty words separated by one tab, got {line!r}"
                )
            if groups is None:
                groups = (cells[0], cells[1])
                continue
            if not all(re.fullmatch(r"[\w'][\w' -]*", c) for c in cells):
                raise SpecError(f"{path}, line {lineno}: swap words are letters, digits, apostrophes: {cells}")
            rows.append((cells[0], cells[1]))
        if groups is None or not rows:
            raise SpecError(f"{path}: needs a header row naming the two groups and at least one swap row")
        if groups[0] == groups[1]:
            raise SpecError(f"{path}: the header names the same group twice ({groups[0]!r})")
        return cls(groups, tuple(rows))

    def lexicon(self) -> dict[str, list[str]]:
        """Group -> its words (for the attribute check)."""
        return {g: list(dict.fromkeys(r[i] for r in self.rows)) for i, g in enumerate(self.groups)}

    def mapping(self) -> tuple[dict[str, str], dict[str, str], list[str]]:
        """(lower-case word -> partner, lower-case word -> its group, words with several partners)."""
        partner: dict[str, str] = {}
        group: dict[str, str] = {}
        ambiguous = []
        for a, b in self.rows:
            for src, dst, g in ((a, b, self.groups[0]), (b, a, self.groups[1])):
                key = src.lower()
                if key in partner:
                    if partner[key] != dst.lower():
                        ambiguous.append(src)
                    continue
                partner[key], group[key] = dst.lower(), g
        for key, dst in list(partner.items()):  # regular plurals, unless listed
            for suffix in ("s",):
                if key + suffix not in partner and not key.endswith("s"):
                    partner[key + suffix], group[key + suffix] = dst + suffix, group[key]
        return partner, group, sorted(set(ambiguous))


def _match_case(word: str, template: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def substitute(text: str, partner: Mapping[str, str]) -> tuple[str, list[str]]:
    """``text`` with every whole word in ``partner`` (case-insensitive) swapped, case kept; and the words swapped."""
    if not partner:
        return text, []
    alts = sorted(partner, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w])(" + "|".join(re.escape(w) for w in alts) + r")(?![\w])", re.IGNORECASE)
    swapped: list[str] = []

    def repl(m: re.Match[str]) -> str:
        swapped.append(m.group(1).lower())
        return _match_case(partner[m.group(1).lower()], m.group(1))

    return pattern.sub(repl, text), swapped


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str | None = None


def read_labelled_texts(path: str | Path) -> list[LabelledText]:
    """Texts (and labels when the file has them) from ``.txt``, ``.jsonl`` or ``.csv`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No text file at {path}")
    suffix = path.suffix.lower()
    out: list[LabelledText] = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SpecError(f"{path}, line {lineno}: invalid JSON: {err.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SpecError(f"{path}, line {lineno}: each line needs a 'text' string")
            label = record.get("label")
            out.append(LabelledText(record["text"], None if label is None else str(label)))
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            column = next((c for c in _TEXT_COLUMNS if c in columns), None)
            if column is None:
                raise SpecError(f"{path}: no text column; name one of {list(_TEXT_COLUMNS)} (it has {columns})")
            for row in reader:
                label = row.get("label")
                out.append(LabelledText(row[column], label if label not in (None, "") else None))
    else:
        out = [LabelledText(t) for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    if not out:
        raise SpecError(f"{path}: no texts")
    return out


def _candidates(answers: Mapping[str, str] | Sequence[str]) -> tuple[dict[str, str] | None, list[str]]:
    if isinstance(answers, Mapping):
        if len(answers) < 2 or not all(isinstance(a, str) and a for a in answers.values()):
            raise SpecError("'answers' maps each label to a non-empty answer, two labels at least")
        return {str(k): v for k, v in answers.items()}, list(dict.fromkeys(answers.values()))
    values = list(answers)
    if len(values) < 2 or not all(isinstance(a, str) and a for a in values):
        raise SpecError("'answers' is a list of two or more candidate tokens (or an object label -> answer)")
    return None, values


def check_answers(
    answers: Mapping[str, str] | Sequence[str], tokenizer: Any
) -> tuple[dict[str, str] | None, list[str]]:
    """(label -> answer or None, the candidates), every candidate one token for ``tokenizer``; else SpecError."""
    by_label, cands = _candidates(answers)
    for a in cands:
        ids = tokenizer(a, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SpecError(f"answer {a!r} is {len(ids)} tokens for this tokenizer; answers must be one token")
    return by_label, cands


def text_probe(
    item: LabelledText,
    by_label: Mapping[str, str] | None,
    cands: Sequence[str],
    *,
    suffix: str = "",
    counterfactual: str | None = None,
    group: str | None = None,
) -> ProbeExample:
    """The probe of one text: its label's answer (or the first candidate when unlabelled), the rest as alternatives."""
    answer = by_label[item.label] if by_label is not None and item.label is not None else cands[0]
    alternatives = tuple(c for c in cands if c != answer)
    return ProbeExample(item.text + suffix, answer, alternatives, spurious_counterfactual=counterfactual, group=group)


def generate_substitution_pairs(
    texts: Sequence[LabelledText | str],
    swaps: SwapList,
    tokenizer: Any,
    *,
    answers: Mapping[str, str] | Sequence[str],
    suffix: str = "",
    holdout: float = 0.0,
    seed: int = 0,
    equal_length: bool = False,
) -> PairsResult:
    """Counterfactual pairs of ``texts`` by swapping ``swaps`` (see the module docstring)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    items = [t if isinstance(t, LabelledText) else LabelledText(t) for t in texts]
    by_label, cands = check_answers(answers, tokenizer)
    labels = {t.label for t in items if t.label is not None}
    if by_label is not None:
        missing = sorted(labels - set(by_label))
        if missing:
            raise SpecError(f"labels {missing} of the texts have no answer; 'answers' names {sorted(by_label)}")
    rng = np.random.default_rng(seed)
    row_keep, row_held = _split(range(len(swaps.rows)), holdout, rng)
    text_keep, text_held = _split(range(len(items)), holdout, rng)
    held_words = {w.lower() for i in row_held for w in swaps.rows[i]}
    held_words |= {w + "s" for w in held_words}
    partner, group, ambiguous = swaps.mapping()
    n_tokens = lambda s: len(tokenizer(s)["input_ids"])  # noqa: E731

    def probe(item: LabelledText, cf: str | None, g: str | None) -> ProbeExample:
        return text_probe(item, by_label, cands, suffix=suffix, counterfactual=cf, group=g)

    counts: Counter = Counter()
    rejected: dict[str, list[dict[str, str]]] = {"train": [], "heldout": []}
    out: dict[str, list[ProbeExample]] = {"train": [], "heldout": []}
    task: dict[str, list[ProbeExample]] = {"train": [], "heldout": []}
    held_texts = set(text_held)
    for i, item in enumerate(items):
        part = "heldout" if i in held_texts else "train"
        if item.label is not None and by_label is not None:
            task[part].append(probe(item, None, f"label-{item.label}"))
        cf, words = substitute(item.text, partner)
        if not words:
            counts["texts without an attribute word"] += 1
            continue
        uses_held = any(w in held_words for w in words)
        if (part == "train") == uses_held:
            counts["texts dropped: held-out words in a training text, or only seen words in a held-out text"] += 1
            continue
        groups = Counter(group[w] for w in words)
        top = groups.most_common(2)
        g = top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else None
        if g is None:
            counts["texts with both groups' words equally (no group; swapped anyway)"] += 1
        if n_tokens(item.text + suffix) != n_tokens(cf + suffix):
            if equal_length:
                rejected[part].append({"template": item.text[:80], "value": ",".join(words),
                                       "reason": "the counterfactual has another token length (--equal-length)"})  # fmt: skip
                continue
            counts[f"{part}: pairs of different token lengths (aligned on final positions)"] += 1
        out[part].append(probe(item, cf + suffix, g))
    if not out["train"]:
        raise SpecError(
            f"no training pair: none of the {len(items)} texts contains a (non-held-out) word of the swap list"
        )
    digest = hashlib.sha256(
        json.dumps({"swaps": [swaps.groups, swaps.rows], "answers": answers, "suffix": suffix}, sort_keys=True,
                   default=list).encode()
    ).hexdigest()  # fmt: skip
    report = {
        "generator": "substitution",
        "spec_sha256": digest,
        "tokenizer": Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name,
        "seed": seed,
        "holdout": holdout,
        "length_rule": (
            "counterfactuals of another token length are rejected (--equal-length)" if equal_length else
            "counterfactuals of another token length are kept and aligned on their final positions "
            "(the trainer's cf_length='right'); `icp-lens score` needs equal lengths: pass --equal-length"
        ),
        "counts": {
            "texts": len(items), "pairs": len(out["train"]), "task": len(task["train"]),
            "heldout_pairs": len(out["heldout"]), "heldout_task": len(task["heldout"]),
            "pairs_by_group": dict(Counter(p.group for p in out["train"])),
            **dict(counts),
        },
        "rejected": rejected,
        "ambiguous_words": ambiguous,
        "heldout_values": {"swap_rows": [list(swaps.rows[i]) for i in row_held], "texts": len(text_held)},
    }  # fmt: skip
    return PairsResult(
        tuple(out["train"]), tuple(task["train"]), tuple(out["heldout"]), tuple(task["heldout"]), report
    )

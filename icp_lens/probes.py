"""Probe sets: the prompts on which spurious features are measured.

A probe file is JSON Lines, one example per line::

    {"prompt": "The nurse said that", "answer": " she", "alternatives": [" he"],
     "spurious_counterfactual": "The carpenter said that",
     "causal_counterfactual": "The man said that", "causal_answer": " he",
     "group": "female-stereotyped"}

- ``prompt``: the text the model reads; its next token should be ``answer``.
- ``answer``: the right next token, written exactly as it is appended after the
  prompt (``" she"`` with a leading space for GPT-2-style tokenizers).
- ``alternatives``: the wrong next tokens it competes with (at least one; the answer
  is not among them).
- ``spurious_counterfactual`` (optional): the prompt with only the spurious attribute
  changed; the right answer stays ``answer``.
- ``causal_counterfactual`` (optional): the prompt with the true cause changed; the
  right answer becomes ``causal_answer`` (which requires a causal counterfactual, of
  the text or of the image).
- ``group`` (optional): a label for group-wise metrics (e.g. worst-group accuracy).
- ``image`` (optional): an image the model sees with the prompt (vision-language
  models), a path relative to the JSONL file.
- ``image_counterfactual`` (optional, needs ``image``): the image with only the spurious
  attribute changed (same object, other background); the right answer stays ``answer``.
- ``image_causal_counterfactual`` (optional, needs ``image`` and ``causal_answer``): the
  image with only the true cause changed (other object, same background); the prompt
  stays, and the right answer becomes ``causal_answer``.

Files without images are read exactly as before. :func:`read_probes` checks every image
when it reads the file: it must exist, open as an image, and have the size of the file's
first image (or ``image_size``), and each error names the line.

Every reader error is a :class:`ProbeFormatError` naming the file, the 1-based line
and what is wrong. With a tokenizer, :func:`read_probes` also checks that every answer
is exactly one token (``tokenizer(text, add_special_tokens=False)``), since metrics
compare next-token logits.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ProbeExample",
    "unknown_words",
    "ProbeFormatError",
    "FIELDS",
    "REQUIRED_FIELDS",
    "read_probes",
    "write_probes",
    "probes_to_frame",
    "probes_from_frame",
    "single_token_id",
    "length_mismatches",
    "IMAGE_FIELDS",
    "image_file",
]

REQUIRED_FIELDS: tuple[str, ...] = ("prompt", "answer", "alternatives")
_OPTIONAL_FIELDS: tuple[str, ...] = (
    "spurious_counterfactual",
    "causal_counterfactual",
    "causal_answer",
    "group",
    "image",
    "image_counterfactual",
    "image_causal_counterfactual",
)
IMAGE_FIELDS: tuple[str, ...] = ("image", "image_counterfactual", "image_causal_counterfactual")
FIELDS: tuple[str, ...] = REQUIRED_FIELDS + _OPTIONAL_FIELDS


class ProbeFormatError(ValueError):
    """A probe example or file that does not follow the probe format."""


def _where(path: str | Path | None, line: int | None) -> str:
    if path is None and line is None:
        return ""
    place = str(path) if path is not None else "<probes>"
    return f"{place}, line {line}: " if line is not None else f"{place}: "


@dataclass(frozen=True)
class ProbeExample:
    """One probe: after ``prompt`` the model should say ``answer``, not ``alternatives``."""

    prompt: str
    answer: str
    alternatives: tuple[str, ...]
    spurious_counterfactual: str | None = None
    causal_counterfactual: str | None = None
    causal_answer: str | None = None
    group: str | None = None
    image: str | None = None
    image_counterfactual: str | None = None
    image_causal_counterfactual: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alternatives, list):
            object.__setattr__(self, "alternatives", tuple(self.alternatives))
        problem = _problem(self)
        if problem is not None:
            raise ProbeFormatError(problem)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; optional fields that are ``None`` are omitted."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = list(value) if f.name == "alternatives" else value
        return out

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], *, line: int | None = None, path: str | Path | None = None
    ) -> ProbeExample:
        """Validate and build an example; errors name ``path`` and ``line`` when given."""
        where = _where(path, line)
        if not isinstance(d, Mapping):
            raise ProbeFormatError(f"{where}expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ProbeFormatError(f"{where}unknown field(s) {unknown}; valid fields: {list(FIELDS)}")
        missing = [name for name in REQUIRED_FIELDS if name not in d]
        if missing:
            raise ProbeFormatError(f"{where}missing required field(s) {missing}")
        for name in FIELDS:
            value = d.get(name)
            if name == "alternatives":
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
                if not ok:
                    raise ProbeFormatError(f"{where}field 'alternatives' must be a list of strings, got {value!r}")
            elif value is not None and not isinstance(value, str):
                raise ProbeFormatError(f"{where}field {name!r} must be a string, got {type(value).__name__} {value!r}")
            elif value is None and name in REQUIRED_FIELDS:
                raise ProbeFormatError(f"{where}field {name!r} must be a string, got null")
        try:
            return cls(**{name: d.get(name) for name in FIELDS})
        except ProbeFormatError as err:
            raise ProbeFormatError(f"{where}{err}") from None


def _problem(ex: ProbeExample) -> str | None:
    """What is wrong with an example's contents, or ``None``."""
    if not isinstance(ex.prompt, str) or not isinstance(ex.answer, str):
        return "'prompt' and 'answer' must be strings"
    if not isinstance(ex.alternatives, tuple) or not all(isinstance(a, str) for a in ex.alternatives):
        return f"'alternatives' must be strings, got {ex.alternatives!r}"
    if len(ex.alternatives) == 0:
        return "'alternatives' is empty; give at least one wrong answer"
    if ex.answer in ex.alternatives:
        return f"answer {ex.answer!r} is listed among alternatives {list(ex.alternatives)}"
    if ex.causal_answer is not None and ex.causal_counterfactual is None and ex.image_causal_counterfactual is None:
        return "'causal_answer' is given without 'causal_counterfactual'"
    for field in ("image_counterfactual", "image_causal_counterfactual"):
        if getattr(ex, field) is not None and ex.image is None:
            return f"'{field}' is given without 'image'"
    if ex.image_causal_counterfactual is not None and ex.causal_answer is None:
        return "'image_causal_counterfactual' is given without 'causal_answer' (the answer the other object needs)"
    return None


def _check_image(path: Path, field: str, name: str, expected: tuple[int, int] | None, where: str) -> tuple[int, int]:
    """Open ``name`` (relative to the probe file's folder); its ``(width, height)``, or a ProbeFormatError."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow comes with the vision, plot and test extras
        raise ProbeFormatError(f"{where}{field} needs Pillow to be checked: pip install 'icp-lens[vision]'") from None
    file = path.parent / name
    if not file.is_file():
        raise ProbeFormatError(f"{where}{field} {name!r} not found (looked for {file})")
    try:
        with Image.open(file) as img:
            img.load()
            size = (int(img.width), int(img.height))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        why = f"{type(err).__name__}: {err}"
        raise ProbeFormatError(f"{where}{field} {name!r} is not a readable image ({why})") from None
    if expected is not None and size != expected:
        raise ProbeFormatError(
            f"{where}{field} {name!r} is {size[0]}x{size[1]}, expected {expected[0]}x{expected[1]} "
            "(every image of a probe file has one size)"
        )
    return size


def image_file(probe_file: str | Path, ex: ProbeExample, field: str = "image") -> Path | None:
    """The path of ``ex``'s ``image`` (or another of ``IMAGE_FIELDS``), resolved against its probe file's folder."""
    if field not in IMAGE_FIELDS:
        raise ValueError(f"field must be one of {IMAGE_FIELDS}, got {field!r}")
    name = getattr(ex, field)
    return None if name is None else Path(probe_file).parent / name


def single_token_id(tokenizer: Any, text: str) -> int:
    """The id of ``text`` as one token appended after a prompt.

    ``text`` is tokenized as given (``add_special_tokens=False``), so write it the way
    it follows the prompt (``" she"`` for GPT-2-style tokenizers). Raises
    ``ValueError`` (showing the tokens) unless it is exactly one token that is not the
    unknown token.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        tokens = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{text!r} is not a single token: it tokenizes to {len(ids)} tokens {tokens} (ids {ids})")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and text.strip() != tokenizer.unk_token:
        raise ValueError(f"{text!r} is not in the vocabulary: it tokenizes to the unknown token")
    return int(ids[0])


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` maps to its unknown token (empty when none).

    Out-of-vocabulary words would otherwise become the unknown (often the pad) token, and a
    score measured on them means nothing. A literal unknown-token string in ``text`` is fine.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc.get("offset_mapping")
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        enc, spans = tokenizer(text, add_special_tokens=False), None
    ids = list(enc["input_ids"])
    if unk not in ids:
        return []
    literal = str(getattr(tokenizer, "unk_token", "") or "")
    words = []
    for i, token_id in enumerate(ids):
        if token_id != unk:
            continue
        word = text[spans[i][0] : spans[i][1]].strip() if spans is not None else f"token {i}"
        if word and word != literal and word not in words:
            words.append(word)
    return words


def length_mismatches(examples: Sequence[ProbeExample], tokenizer: Any) -> list[dict[str, Any]]:
    """Counterfactuals whose token count differs from their prompt's under ``tokenizer``.

    Position-by-position patching (``ProbeSet``'s strict alignment rule) needs a
    counterfactual of the same token length as its prompt; word lists chosen by eye
    often break that for one tokenizer and not another ("firefighter" is one GPT-2 token
    and two SmolLM2 tokens). One dict per mismatch: ``index, prompt, field,
    counterfactual, n_prompt, n_counterfactual`` (tokenized with
    ``add_special_tokens=False``). Empty when every counterfactual aligns.
    """

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = []
    for i, ex in enumerate(examples):
        n = n_tokens(ex.prompt)
        for name in ("spurious_counterfactual", "causal_counterfactual"):
            cf = getattr(ex, name)
            if cf is not None and n_tokens(cf) != n:
                out.append(
                    {
                        "index": i,
                        "prompt": ex.prompt,
                        "field": name,
                        "counterfactual": cf,
                        "n_prompt": n,
                        "n_counterfactual": n_tokens(cf),
                    }
                )
    return out


def read_probes(
    path: str | Path, *, tokenizer: Any = None, image_size: tuple[int, int] | None = None
) -> list[ProbeExample]:
    """Read and validate a probe JSONL file (blank lines are skipped).

    Images (``IMAGE_FIELDS``: paths relative to the file) must exist,
    open, and be ``image_size`` ``(width, height)`` when given, else the size of the
    file's first image; the paths are kept as written (:func:`image_file` resolves them).

    With ``tokenizer``, every ``answer``, alternative and ``causal_answer`` must be
    exactly one token, and no word of a prompt or counterfactual may be out of the
    vocabulary (it would silently become the unknown token). Raises
    :class:`ProbeFormatError` naming the file and 1-based line. Warns about exact
    duplicate lines and about a file of one example (a bootstrap interval over one
    example is not an interval).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such probe file")
    examples: list[ProbeExample] = []
    cache: dict[str, str | None] = {}
    seen: dict[str, int] = {}
    duplicates: list[tuple[int, int]] = []
    with path.open("rb") as fh:  # decoded line by line, so an encoding error names its line
        for lineno, raw_bytes in enumerate(fh, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ProbeFormatError(
                    f"{path}, line {lineno}: not UTF-8 text ({err.reason} at byte {err.start} of the line); "
                    "save the file as UTF-8"
                ) from None
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ProbeFormatError(f"{path}, line {lineno}: invalid JSON: {err}") from None
            ex = ProbeExample.from_dict(record, line=lineno, path=path)
            for field in IMAGE_FIELDS:
                name = getattr(ex, field)
                if name is not None:
                    image_size = _check_image(path, field, name, image_size, f"{path}, line {lineno}: ")
            if tokenizer is not None:
                for text in (ex.answer, *ex.alternatives, ex.causal_answer):
                    if text is None:
                        continue
                    if text not in cache:
                        try:
                            single_token_id(tokenizer, text)
                            cache[text] = None
                        except ValueError as err:
                            cache[text] = str(err)
                    if cache[text] is not None:
                        raise ProbeFormatError(f"{path}, line {lineno}: {cache[text]}")
                for field in ("prompt", "spurious_counterfactual", "causal_counterfactual"):
                    unknown = unknown_words(tokenizer, getattr(ex, field) or "")
                    if unknown:
                        raise ProbeFormatError(
                            f"{path}, line {lineno}: {field} has words the tokenizer does not know "
                            f"({', '.join(map(repr, unknown))}): they would become the unknown token"
                        )
            key = raw.strip()
            if key in seen:
                duplicates.append((seen[key], lineno))
            else:
                seen[key] = lineno
            examples.append(ex)
    if not examples:
        raise ProbeFormatError(f"{path}: the probe file is empty")
    if duplicates:
        pairs = ", ".join(f"{b} repeats {a}" for a, b in duplicates[:5])
        warnings.warn(f"{path}: {len(duplicates)} duplicate line(s) (line {pairs}); each counts again", stacklevel=2)
    if len(examples) == 1:
        warnings.warn(f"{path}: one example only; its bootstrap interval is not an interval", stacklevel=2)
    return examples


def write_probes(path: str | Path, examples: Iterable[ProbeExample]) -> Path:
    """Write examples as JSON Lines (UTF-8, one object per line); returns the path."""
    path = Path(path)
    lines = [json.dumps(ex.to_dict(), ensure_ascii=False) for ex in examples]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def probes_to_frame(examples: Sequence[ProbeExample]) -> pd.DataFrame:
    """One row per example, one column per field (``alternatives`` holds lists)."""
    import pandas as pd

    rows = []
    for ex in examples:
        row = {name: getattr(ex, name) for name in FIELDS}
        row["alternatives"] = list(ex.alternatives)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(FIELDS))


def probes_from_frame(df: pd.DataFrame) -> list[ProbeExample]:
    """Examples from a frame with at least the required columns (None/NaN = missing)."""
    examples = []
    for i, (index, row) in enumerate(df.iterrows(), start=1):
        record = {}
        for key, value in row.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if key == "alternatives" and not isinstance(value, str):
                value = list(value)
            record[key] = value
        try:
            examples.append(ProbeExample.from_dict(record))
        except ProbeFormatError as err:
            raise ProbeFormatError(f"DataFrame row {i} (index {index!r}): {err}") from None
    return examples

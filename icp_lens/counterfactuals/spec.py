"""The pair spec: a documented JSON contract.

```json
{"templates": ["The {x} said that", "Yesterday the {x} wrote that"],
 "spurious": {"female": ["nurse", "secretary"], "male": ["mechanic", "pilot"]},
 "causal":   {"female": ["woman", "mother"],   "male": ["man", "father"]},
 "answers":  {"female": " she", "male": " he"},
 "neutral":  ["person", "worker"]}
```

- ``templates``: strings with exactly one ``{x}`` slot (other braces are literal text);
- ``spurious``: group -> values of the attribute that must not matter (two or more groups);
- ``causal``: group -> values that legitimately decide the answer (the same groups;
  optional: without it there are no causal counterfactuals and no task prompts);
- ``answers``: group -> the continuation that group's causal values call for (one token
  each for the model that will read the pairs);
- ``neutral``: optional values with no group, used as extra spurious counterfactuals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PairSpec", "SpecError"]

_KEYS = ("templates", "spurious", "causal", "answers", "neutral")


class SpecError(ValueError):
    """A pair spec that cannot be used; the message names the key at fault."""


def _groups(d: Any, key: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(d, dict) or not d:
        raise SpecError(f"'{key}' must be an object mapping each group to a list of values")
    out = {}
    for g, values in d.items():
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise SpecError(f"'{key}.{g}' must be a non-empty list of non-empty strings")
        if len(set(values)) != len(values):
            raise SpecError(f"'{key}.{g}' repeats a value")
        out[str(g)] = tuple(values)
    return out


@dataclass(frozen=True)
class PairSpec:
    """A validated pair spec (see the module docstring for the JSON form)."""

    templates: tuple[str, ...]
    spurious: dict[str, tuple[str, ...]]
    answers: dict[str, str]
    causal: dict[str, tuple[str, ...]] = field(default_factory=dict)
    neutral: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Any) -> PairSpec:
        if not isinstance(d, dict):
            raise SpecError(
                "a pair spec is a JSON object with 'templates', 'spurious', 'answers' (and 'causal', 'neutral')"
            )
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise SpecError(f"unknown keys {unknown}; valid: {list(_KEYS)}")
        for key in ("templates", "spurious", "answers"):
            if key not in d:
                raise SpecError(f"missing '{key}'")
        templates = d["templates"]
        if not isinstance(templates, list) or not templates:
            raise SpecError("'templates' must be a non-empty list of strings")
        for i, t in enumerate(templates):
            if not isinstance(t, str) or t.count("{x}") != 1:
                raise SpecError(f"templates[{i}] must contain the slot {{x}} exactly once: {t!r}")
        if len(set(templates)) != len(templates):
            raise SpecError("'templates' repeats a template")
        spurious = _groups(d["spurious"], "spurious")
        if len(spurious) < 2:
            raise SpecError("'spurious' needs at least two groups (a counterfactual comes from another group)")
        answers = d["answers"]
        if not isinstance(answers, dict) or set(answers) != set(spurious):
            raise SpecError(f"'answers' must name one answer per group {sorted(spurious)}, got {sorted(answers or {})}")
        if not all(isinstance(a, str) and a for a in answers.values()):
            raise SpecError("every answer must be a non-empty string")
        if len(set(answers.values())) != len(answers):
            raise SpecError("two groups share an answer: the answer must tell the groups apart")
        causal = _groups(d["causal"], "causal") if d.get("causal") else {}
        if causal and set(causal) != set(spurious):
            raise SpecError(f"'causal' must have the groups of 'spurious' {sorted(spurious)}, got {sorted(causal)}")
        neutral = d.get("neutral") or []
        if not isinstance(neutral, list) or not all(isinstance(v, str) and v.strip() for v in neutral):
            raise SpecError("'neutral' must be a list of non-empty strings")
        overlap = sorted(
            {v for vs in spurious.values() for v in vs} & ({v for vs in causal.values() for v in vs} | set(neutral))
        )
        if overlap:
            raise SpecError(f"values both spurious and causal/neutral: {overlap}")
        return cls(tuple(templates), spurious, {str(k): v for k, v in answers.items()}, causal, tuple(neutral))

    @classmethod
    def load(cls, path: str | Path) -> PairSpec:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No pair spec at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SpecError(f"{path}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
        except UnicodeDecodeError as err:
            raise SpecError(f"{path}: not UTF-8 text") from err
        try:
            return cls.from_dict(data)
        except SpecError as err:
            raise SpecError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "templates": list(self.templates),
            "spurious": {g: list(v) for g, v in self.spurious.items()},
            "causal": {g: list(v) for g, v in self.causal.items()},
            "answers": dict(self.answers),
            "neutral": list(self.neutral),
        }

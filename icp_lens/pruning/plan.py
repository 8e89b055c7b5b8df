"""PrunePlan: a human-readable, JSON record of which features to remove and how.

A plan says *what* to edit, independent of how the model is held (bridge,
HookedTransformer, plain HF model): the features (hook-point features, see
``icp_lens.features``), the mode, the mean constants for mean mode together with the
reference set they came from, a fingerprint of the exact model it was made for, and
its provenance (score table, threshold or k, time, icp_lens version). Applying a plan
to a model with another fingerprint raises ``PlanMismatchError`` naming what differs.

Modes:

- ``zero``: zero the feature's outgoing weights (its activation is replaced by 0);
- ``mean``: zero them and fold ``mean @ W_out`` into the output bias (its activation
  is replaced by its mean over the reference set), which usually disturbs the rest of
  the network far less than zero.

A plan can also name *token-embedding features* (``tokens``, see
``icp_lens.pruning.tokens``): each a token id whose input-embedding row is replaced, by
zero or by a stored vector (the mean input embedding over the reference set), with the
unembedding untied so that the model can still predict the token.

The file (``plan.json``) looks like::

    {"format": "icp_lens.prune_plan", "version": 2, "mode": "mean",
     "features": [{"feature": "head L0.3", "kind": "head", "layer": 0, "index": 3,
                   "mean": [0.12, -0.4, ...]}],
     "tokens": [{"token_id": 1207, "token": "wow", "mode": "mean", "value": [0.02, ...]}],
     "reference": {"n_prompts": 256, "sha256": "...", "description": "probe.jsonl"},
     "fingerprint": {"architecture": "GPT2LMHeadModel", "model_type": "gpt2", ...},
     "provenance": {"scores": "scores.csv", "top_k": 1, "created": "...", ...}}

A plan without tokens is written as version 1 (no ``tokens`` key), exactly as before;
one with tokens as version 2, so that an older icp_lens refuses it instead of silently
skipping the token edits. Both versions load.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from icp_lens.features import Feature

__all__ = [
    "PruneMode",
    "Fingerprint",
    "PrunePlan",
    "TokenRow",
    "PlanMismatchError",
    "fingerprint",
    "provenance",
    "reference_record",
    "PLAN_FILE",
]

PruneMode = Literal["zero", "mean"]
PLAN_FILE = "plan.json"
DIRECTIONS_FILE = "plan.directions.safetensors"
_FORMAT = "icp_lens.prune_plan"
_VERSIONS = (1, 2, 3)  # 2: the plan has token-embedding features; 3: direction features


class PlanMismatchError(ValueError):
    """A plan applied to a model other than the one it was made for."""


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a model's weights: class, shapes and a hash of every tensor."""

    architecture: str
    model_type: str
    n_parameters: int
    shapes_sha256: str
    weights_sha256: str

    def differences(self, other: Fingerprint) -> list[str]:
        return [
            f"{name}: plan {getattr(self, name)!r}, model {getattr(other, name)!r}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        ]


@torch.no_grad()
def fingerprint(model: nn.Module) -> Fingerprint:
    """Fingerprint of an HF model's state dict (every tensor hashed, in name order)."""
    state = model.state_dict()
    shapes = hashlib.sha256()
    weights = hashlib.sha256()
    n = 0
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        shapes.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        weights.update(t.reshape(-1).view(torch.uint8).numpy().data)
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return Fingerprint(
        architecture=type(model).__name__,
        model_type=str(model.config.model_type),
        n_parameters=n,
        shapes_sha256=shapes.hexdigest(),
        weights_sha256=weights.hexdigest(),
    )


@dataclass(frozen=True)
class TokenRow:
    """A token-embedding feature of a plan: the token's input-embedding row and its replacement.

    ``value`` is ``None`` for zero mode, else the vector the row is set to (mean mode: the
    mean input embedding over the reference set). ``token`` is the token's text, for
    people reading the plan (never used to look the id up).
    """

    token_id: int
    value: tuple[float, ...] | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.token_id, bool) or not isinstance(self.token_id, int) or self.token_id < 0:
            raise ValueError(f"A token id is a non-negative integer, got {self.token_id!r}")
        if self.value is not None and not self.value:
            raise ValueError(f"The replacement of token {self.token_id} is empty")

    @property
    def mode(self) -> PruneMode:
        return "zero" if self.value is None else "mean"

    def __str__(self) -> str:
        return f"token {self.token_id}" + (f" ({self.token!r})" if self.token is not None else "")

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"token_id": self.token_id, "token": self.token, "mode": self.mode}
        if self.value is not None:
            entry["value"] = list(self.value)
        return entry

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenRow:
        mode = d.get("mode", "mean" if d.get("value") is not None else "zero")
        if mode not in get_args(PruneMode):
            raise ValueError(f"Unknown token mode {mode!r}; valid: {list(get_args(PruneMode))}")
        if mode == "mean" and d.get("value") is None:
            raise ValueError(f"Token {d.get('token_id')}: mean mode needs its 'value'")
        value = None if mode == "zero" else tuple(float(v) for v in d["value"])
        return cls(int(d["token_id"]), value, d.get("token"))


@dataclass(frozen=True)
class PrunePlan:
    """Features (and token-embedding rows) to remove from one model, the mode, and where it all came from."""

    features: tuple[Feature, ...]
    mode: PruneMode
    fingerprint: Fingerprint
    means: tuple[tuple[float, ...], ...] | None = None
    reference: Mapping[str, Any] | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    tokens: tuple[TokenRow, ...] = ()
    #: direction features (``icp_lens.directions.DirectionSet``) removed in ``direction_mode``
    #: (``project`` or ``mean``); the vectors are saved beside ``plan.json`` as
    #: ``plan.directions.safetensors`` and the plan records their SHA-256
    directions: Any = None
    direction_mode: str = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.direction_mode not in ("project", "mean"):
            raise ValueError(f"Unknown direction mode {self.direction_mode!r}; valid: ['project', 'mean']")
        ids = [t.token_id for t in self.tokens]
        if len(set(ids)) != len(ids):
            raise ValueError(f"A plan lists each token once; got {ids}")
        if len({len(t.value) for t in self.tokens if t.value is not None}) > 1:
            raise ValueError("The token replacements of a plan must all have the model's embedding width")
        if self.mode not in get_args(PruneMode):
            raise ValueError(f"Unknown prune mode {self.mode!r}; valid: {list(get_args(PruneMode))}")
        if len(set(self.features)) != len(self.features):
            raise ValueError("A plan lists each feature once")
        if self.mode == "mean":
            if self.means is None or len(self.means) != len(self.features):
                raise ValueError("A mean-mode plan needs one mean per feature (see make_plan)")
        elif self.means is not None:
            raise ValueError("A zero-mode plan carries no means")

    def mean_of(self, feature: Feature) -> tuple[float, ...]:
        if self.means is None:
            raise ValueError("A zero-mode plan has no means")
        return self.means[self.features.index(feature)]

    def check(self, model: nn.Module) -> None:
        """Raise ``PlanMismatchError`` unless ``model`` is the one the plan was made for."""
        diffs = self.fingerprint.differences(fingerprint(model))
        if diffs:
            raise PlanMismatchError(
                "This plan was made for another model (" + "; ".join(diffs) + "). Make a new plan on this "
                "model, or apply the plan to the checkpoint it was made for."
            )

    # -- JSON -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        feats = []
        for i, f in enumerate(self.features):
            entry: dict[str, Any] = {"feature": str(f), "kind": f.kind, "layer": f.layer, "index": f.index}
            if self.means is not None:
                entry["mean"] = list(self.means[i])
            feats.append(entry)
        out: dict[str, Any] = {
            "format": _FORMAT,
            "version": 3 if self.directions is not None else 2 if self.tokens else 1,
            "mode": self.mode,
            "features": feats,
        }
        if self.tokens:
            out["tokens"] = [t.to_dict() for t in self.tokens]
        if self.directions is not None:
            out["directions"] = {
                "file": DIRECTIONS_FILE,
                "sha256": self.directions.digest(),
                "mode": self.direction_mode,
                "features": [str(f) for f in self.directions.features],
            }
        out.update(
            reference=dict(self.reference) if self.reference is not None else None,
            fingerprint=dict(self.fingerprint.__dict__),
            provenance=dict(self.provenance),
        )
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, directions: Any = None) -> PrunePlan:
        """Read a plan dict; a plan with directions needs their ``DirectionSet`` (``load`` reads it)."""
        if d.get("format") != _FORMAT:
            raise ValueError(f"Not an icp_lens prune plan (format {d.get('format')!r}, expected {_FORMAT!r})")
        if d.get("version") not in _VERSIONS:
            raise ValueError(
                f"Unsupported prune plan version {d.get('version')!r}; this icp_lens reads versions {list(_VERSIONS)}"
            )
        try:
            feats = [Feature(e["kind"], int(e["layer"]), int(e["index"])) for e in d["features"]]
            means = None
            if d["mode"] == "mean":
                means = tuple(tuple(float(v) for v in e["mean"]) for e in d["features"])
            return cls(
                features=tuple(feats),
                mode=d["mode"],
                fingerprint=Fingerprint(**d["fingerprint"]),
                means=means,
                reference=d.get("reference"),
                provenance=d.get("provenance") or {},
                tokens=tuple(TokenRow.from_dict(t) for t in d.get("tokens") or ()),
                directions=_checked_directions(d.get("directions"), directions),
                direction_mode=(d.get("directions") or {}).get("mode", "mean"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"Malformed prune plan: {e!r}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomically), and its direction vectors beside it."""
        path = Path(path)
        if self.directions is not None:
            self.directions.save(path.with_name(DIRECTIONS_FILE))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No prune plan at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from e
        directions = None
        if data.get("directions"):
            from icp_lens.directions import DirectionSet

            side = path.with_name(str(data["directions"].get("file", DIRECTIONS_FILE)))
            if not side.is_file():
                raise FileNotFoundError(f"{path} names direction features but {side} is missing")
            directions = DirectionSet.load(side)
        return cls.from_dict(data, directions=directions)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for f in self.features:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        parts = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in sorted(kinds.items()))
        text = f"{self.mode} mode: {parts}" if parts else ""
        if self.directions is not None:
            n = len(self.directions)
            text += ("; " if text else "") + f"{n} direction{'s' if n != 1 else ''} ({self.direction_mode})"
        if self.tokens:
            modes = sorted({t.mode for t in self.tokens})
            n = len(self.tokens)
            text += ("; " if text else "") + f"{n} token embedding{'s' if n != 1 else ''} ({'/'.join(modes)})"
        return f"PrunePlan({text or 'no features'}; for {self.fingerprint.architecture})"


def _checked_directions(record: Mapping[str, Any] | None, directions: Any) -> Any:
    """The plan's DirectionSet after checking it is the one ``plan.json`` recorded (by SHA-256)."""
    if not record:
        return None
    if directions is None:
        raise ValueError("This plan has direction features; load it with PrunePlan.load (their vectors are beside it)")
    if directions.digest() != record.get("sha256"):
        raise PlanMismatchError(
            "The direction vectors beside this plan are not the ones it was made with (SHA-256 differs): "
            f"expected {str(record.get('sha256'))[:12]}..., found {directions.digest()[:12]}..."
        )
    return directions


def provenance(**fields: Any) -> dict[str, Any]:
    """Provenance record: the given fields plus creation time and icp_lens version."""
    import icp_lens

    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items() if v is not None}
    out["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out["icp_lens_version"] = icp_lens.__version__
    return out


def reference_record(texts: Sequence[str], description: str | None = None) -> dict[str, Any]:
    """What identifies a reference set: its size, a hash of its prompts and a description."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return {"n_prompts": len(texts), "sha256": digest, "description": description}

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

The file (``plan.json``) looks like::

    {"format": "icp_lens.prune_plan", "version": 1, "mode": "mean",
     "features": [{"feature": "head L0.3", "kind": "head", "layer": 0, "index": 3,
                   "mean": [0.12, -0.4, ...]}],
     "reference": {"n_prompts": 256, "sha256": "...", "description": "probe.jsonl"},
     "fingerprint": {"architecture": "GPT2LMHeadModel", "model_type": "gpt2", ...},
     "provenance": {"scores": "scores.csv", "top_k": 1, "created": "...", ...}}
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
    "PlanMismatchError",
    "fingerprint",
    "provenance",
    "reference_record",
    "PLAN_FILE",
]

PruneMode = Literal["zero", "mean"]
PLAN_FILE = "plan.json"
_FORMAT = "icp_lens.prune_plan"


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
class PrunePlan:
    """Features to remove from one model, the mode, and where it all came from."""

    features: tuple[Feature, ...]
    mode: PruneMode
    fingerprint: Fingerprint
    means: tuple[tuple[float, ...], ...] | None = None
    reference: Mapping[str, Any] | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
        return {
            "format": _FORMAT,
            "version": 1,
            "mode": self.mode,
            "features": feats,
            "reference": dict(self.reference) if self.reference is not None else None,
            "fingerprint": dict(self.fingerprint.__dict__),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrunePlan:
        if d.get("format") != _FORMAT:
            raise ValueError(f"Not an icp_lens prune plan (format {d.get('format')!r}, expected {_FORMAT!r})")
        if d.get("version") != 1:
            raise ValueError(f"Unsupported prune plan version {d.get('version')!r}; this icp_lens reads version 1")
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
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"Malformed prune plan: {e!r}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomically)."""
        path = Path(path)
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
        return cls.from_dict(data)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for f in self.features:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        parts = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in sorted(kinds.items()))
        return f"PrunePlan({self.mode} mode: {parts or 'no features'}; for {self.fingerprint.architecture})"


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

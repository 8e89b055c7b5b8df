"""Direction features: a rank-1 edit ``x -> x - a (b.x - m)`` at one site of a transformer.

A unit (neuron, head) is a coordinate the architecture happens to have; the spurious
attribute is rarely aligned with one. A *direction* is the feature the data defines: a
vector ``a`` (the *write* vector, unit length) along which the attribute is written and
a vector ``b`` (the *read* vector, ``b . a = 1``) that measures how much of it an
activation holds. Removing the direction replaces the component ``b . x`` by

- ``project``: zero, ``x - a (b . x)`` (an orthogonal projection when ``b = a``, the
  oblique projection of LEACE otherwise);
- ``mean``: its mean over reference text, ``x - a (b . x - m)`` (the default: ordinary
  inputs keep their average amount of the direction, so the rest of the network sees
  in-distribution activations);
- ``resample``: its value on the counterfactual, ``x - a (b . x - b . x')`` (what scoring
  measures; run time only).

Sites (``icp_lens.features.DIRECTION_SITES``):

- ``resid_pre``: fitted on ``blocks.L.hook_resid_pre`` and removed from the residual
  stream there, i.e. from the output of every module that writes into it before ``L``
  (token and position embeddings, the attention and MLP outputs of blocks ``0..L-1``).
  Because the edit is linear and idempotent, removing it from every earlier writer is
  the same as removing it from the stream at ``L`` (and at every earlier layer), and it
  folds exactly into the weights (Arditi et al. 2024's weight orthogonalisation, there
  over all layers, generalised to oblique reads and means);
- ``attn_out`` / ``mlp_out``: one module's output (a rank-1 edit of its output matrix);
- ``z.H``: head ``H``'s output ``z`` before the output projection.

A :class:`DirectionSet` holds the fitted directions (several per site for rank ``k``),
the residual writers' hook names, and per writer the mean ``m``. It is saved as
safetensors (vectors) with JSON metadata, beside a score table as
``<table stem>.directions.safetensors`` and beside a plan as
``plan.directions.safetensors``; :meth:`DirectionSet.digest` is what ``plan.json``
records.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from icp_lens.features import Feature, parse_site

__all__ = ["Direction", "DirectionSet", "DirectionMode", "DIRECTION_MODES", "sidecar_path"]

DirectionMode = Literal["project", "mean", "resample"]
DIRECTION_MODES: tuple[str, ...] = ("project", "mean", "resample")
_FORMAT = "icp_lens.directions"


@dataclass(frozen=True, eq=False)
class Direction:
    """One fitted direction.

    ``write`` (``a``, unit norm) and ``read`` (``b``, ``b . a = 1``) live in the site's
    space (``d_model``, or ``d_head`` for ``z.H``). ``means`` holds ``m`` for each hook the
    edit applies at (the residual writers for ``resid_pre``, one entry otherwise).
    ``cos_causal`` is the cosine between the *raw* spurious direction and the causal one
    (NaN without causal counterfactuals): near 1, removing one removes the other.
    """

    feature: Feature
    write: Float[Tensor, " d"]
    read: Float[Tensor, " d"]
    means: Float[Tensor, " n_hooks"]
    source: str = "leace"
    cos_causal: float = math.nan

    def __post_init__(self) -> None:
        if self.feature.kind != "direction":
            raise ValueError(f"A Direction needs a direction feature, got {self.feature}")
        if self.write.shape != self.read.shape or self.write.ndim != 1:
            raise ValueError(f"write and read must be vectors of one size; got {tuple(self.write.shape)}, "
                             f"{tuple(self.read.shape)}")  # fmt: skip
        dot = float(self.read.double() @ self.write.double())
        if not math.isfinite(dot) or abs(dot - 1) > 1e-3:
            raise ValueError(f"{self.feature}: read . write must be 1 (the edit must be idempotent), got {dot:.6g}")

    @property
    def site(self) -> str:
        return self.feature.site

    @property
    def head(self) -> int | None:
        return parse_site(self.site)[1]

    def with_means(self, means: Tensor) -> Direction:
        return replace(self, means=means.detach().double().cpu())

    def amount(self, x: Tensor) -> Tensor:
        """``b . x`` in fp32 or better (the component the edit replaces)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return x.to(dtype) @ self.read.to(device=x.device, dtype=dtype)


def sidecar_path(path: str | Path) -> Path:
    """``scores.csv`` -> ``scores.directions.safetensors`` (beside the table)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.directions.safetensors")


@dataclass(frozen=True, eq=False)
class DirectionSet:
    """Fitted directions and the residual writers they are removed from.

    ``writers`` are the hook names that write into the residual stream (e.g.
    ``hook_embed``, ``blocks.0.hook_attn_out``, ...), in order; a ``resid_pre``
    direction's ``means`` has one entry per writer. ``info`` records how they were fitted.
    """

    directions: tuple[Direction, ...]
    writers: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from icp_lens.directions.intervene import writers_before

        seen: set[Feature] = set()
        for d in self.directions:
            if d.feature in seen:
                raise ValueError(f"Duplicate direction {d.feature}")
            seen.add(d.feature)
            expected = len(writers_before(self.writers, d.feature.layer)) if d.site == "resid_pre" else 1
            if d.means.numel() != expected:
                raise ValueError(f"{d.feature}: {d.means.numel()} means, expected {expected} (one per edited hook)")

    def __len__(self) -> int:
        return len(self.directions)

    def __iter__(self) -> Iterator[Direction]:
        return iter(self.directions)

    @property
    def features(self) -> list[Feature]:
        return [d.feature for d in self.directions]

    def get(self, feature: Feature | str) -> Direction:
        feature = Feature.parse(feature) if isinstance(feature, str) else feature
        for d in self.directions:
            if d.feature == feature:
                return d
        raise KeyError(f"No direction {feature}; this set has {[str(f) for f in self.features][:8]}")

    def subset(self, features: Sequence[Feature | str]) -> DirectionSet:
        """The directions for ``features`` (in this set's order)."""
        wanted = {Feature.parse(f) if isinstance(f, str) else f for f in features}
        missing = wanted - set(self.features)
        if missing:
            raise KeyError(f"Directions {sorted(str(f) for f in missing)} are not in this set")
        return DirectionSet(tuple(d for d in self.directions if d.feature in wanted), self.writers, dict(self.info))

    def concat(self, other: DirectionSet) -> DirectionSet:
        if self.writers and other.writers and self.writers != other.writers:
            raise ValueError("Cannot join direction sets fitted on models with different residual writers")
        return DirectionSet(
            self.directions + other.directions, self.writers or other.writers, {**self.info, **other.info}
        )

    # -- files --------------------------------------------------------------------------
    def _payload(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors: dict[str, Tensor] = {}
        rows = []
        for i, d in enumerate(self.directions):
            tensors[f"{i}.write"] = d.write.detach().double().cpu().contiguous()
            tensors[f"{i}.read"] = d.read.detach().double().cpu().contiguous()
            tensors[f"{i}.means"] = d.means.detach().double().cpu().reshape(-1).contiguous()
            cos = None if math.isnan(d.cos_causal) else d.cos_causal
            rows.append({"feature": str(d.feature), "source": d.source, "cos_causal": cos})
        meta = {"format": _FORMAT, "version": "1", "directions": json.dumps(rows),
                "writers": json.dumps(list(self.writers)),
                "info": json.dumps(self.info, default=str)}  # fmt: skip
        return tensors, meta

    def digest(self) -> str:
        """SHA-256 of the vectors, means and metadata (what ``plan.json`` records)."""
        tensors, meta = self._payload()
        h = hashlib.sha256(json.dumps({k: meta[k] for k in ("directions", "writers")}, sort_keys=True).encode())
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write safetensors (float64 vectors; metadata as JSON strings), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, meta = self._payload()
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        """Read a set written by :meth:`save` (safetensors only: no pickle is ever loaded)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No direction file at {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable direction file: {err}") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an icp_lens direction file (format {meta.get('format')!r})")
        rows = json.loads(meta["directions"])
        directions = []
        for i, row in enumerate(rows):
            cos = row.get("cos_causal")
            directions.append(
                Direction(Feature.parse(row["feature"]), tensors[f"{i}.write"], tensors[f"{i}.read"],
                          tensors[f"{i}.means"], row.get("source", "?"), math.nan if cos is None else float(cos))
            )  # fmt: skip
        return cls(tuple(directions), tuple(json.loads(meta.get("writers", "[]"))), json.loads(meta.get("info", "{}")))

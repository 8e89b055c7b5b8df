"""Provenance of a score table: which model, which probes and which settings produced it.

A score table's rows name features by layer and index, which exist in many models: a
table scored on SmolLM2 names indices that a 2-layer model has too, so pruning the
wrong model with it would succeed and mean nothing. ``icp-lens score`` therefore writes
``<table stem>.meta.json`` beside the table::

    {"format": "icp_lens.score_table/1",
     "model": {"architecture": ..., "model_type": ..., "n_parameters": ...,
               "shapes_sha256": ..., "weights_sha256": ...},     # pruning.fingerprint
     "probe": {"path": "probe.jsonl", "sha256": ..., "n_examples": 60},
     "settings": {"method": "hybrid", "kinds": [...], ...}}

``ScoreTable.load`` reads it back (``table.meta``); ``prune`` compares ``model`` with the
model it is about to edit and refuses a mismatch, naming what differs, unless
``force=True`` (``--force``). Tables without the file (older ones, hand-written ones)
are accepted as before.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "ProvenanceError", "meta_path", "table_provenance", "check_model", "file_digest"]

FORMAT = "icp_lens.score_table/1"


class ProvenanceError(ValueError):
    """A score table was computed on another model than the one it is applied to."""


def meta_path(path: str | Path) -> Path:
    """``scores.csv`` -> ``scores.meta.json`` (beside the table)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.meta.json")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def table_provenance(
    model: Any, probe: str | Path | None = None, *, n_examples: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The provenance record of a table scored on ``model`` (bridge, HF model or checkpoint directory)."""
    from icp_lens.pruning.plan import fingerprint
    from icp_lens.pruning.source import clean_hf_model

    clean = clean_hf_model(model)
    record: dict[str, Any] = {"format": FORMAT, "model": asdict(fingerprint(clean))}
    del clean
    if probe is not None:
        record["probe"] = {"path": Path(probe).name, "sha256": file_digest(probe), "n_examples": n_examples}
    record["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (settings or {}).items()}
    return record


def check_model(meta: Mapping[str, Any] | None, model_fingerprint: Any, *, table: str = "the score table",
                force: bool = False) -> list[str]:  # fmt: skip
    """Compare a table's recorded model with ``model_fingerprint``; raise (or, with ``force``, warn) on a mismatch.

    Returns the differences (empty when they match or the table records no model).
    """
    if not meta or "model" not in meta:
        return []
    mine = asdict(model_fingerprint)
    saved = meta["model"]
    diffs = [
        f"{k}: table {_short(saved.get(k))}, model {_short(mine.get(k))}"
        for k in ("architecture", "model_type", "n_parameters", "shapes_sha256", "weights_sha256")
        if k in saved and saved.get(k) != mine.get(k)
    ]
    if diffs:
        text = f"{table} was scored on another model ({'; '.join(diffs)})"
        if not force:
            raise ProvenanceError(text + "; score this model, or pass --force (force=True) to prune it anyway")
        warnings.warn(text + "; pruning anyway (--force)", stacklevel=3)
    return diffs


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) == 64 else text

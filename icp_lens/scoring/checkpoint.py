"""Resumable partial results of ``exact_effects`` (its ``checkpoint=path`` argument).

``exact_effects`` fills a ``[n_features, n_examples]`` table one pass at a time: the
features are split into chunks of at most ``features_per_pass`` and the probe examples
into batches of ``batch_size``, and each (chunk, batch) pair is one patched forward pass.
A checkpoint lets an interrupted run pick up where it stopped.

**What is stored.** One safetensors file (plain tensors and string metadata, no
pickling) with

* ``values`` -- the ``[n_features, n_examples]`` effects so far (``NaN`` where not computed);
* ``clean`` -- the clean metric ``P(M(x))`` per example (``NaN`` where not computed);
* ``done`` -- ``[n_chunks, n_batches]`` flags: which (chunk, batch) passes are finished;
* ``clean_done`` -- ``[n_batches]`` flags: which batches have their clean metric;

and, as metadata, ``format`` (:data:`FORMAT`) plus the run's description from
:func:`run_meta`.

**When it is written.** After a finished pass, at most every :data:`SAVE_EVERY_S`
seconds, and always once more when the run ends, normally or not (``exact_effects``
saves in a ``finally`` clause, so Ctrl-C or an error keeps the work done). Each save
writes ``path.tmp`` and renames it over ``path`` (atomic), so an interruption during a
save leaves the previous checkpoint intact.

**Resuming.** Calling ``exact_effects`` again with the same ``checkpoint`` loads the
file, and the passes whose ``done`` flag is set are skipped (a batch whose passes are
all done and whose clean metric is known is skipped entirely). A finished checkpoint
therefore answers without any forward pass.

**A run with other settings is refused, not mixed in.** :func:`run_meta` records
everything the stored numbers depend on: the feature list, intervention, metric,
positions, ``batch_size`` and ``features_per_pass``, the chunks the features were split
into (``plan``: they depend on these and on whether the model can skip the blocks before a
chunk's layer, so on the model class and the device; a checkpoint without this entry,
from an older version, is refused too), a digest of the model's weights and a digest of
the probe examples (:func:`fingerprint`). On loading, every one of these must equal the current run's, or
a ``ValueError`` names the first that differs (``"... written for a different run:
intervention is 'resample' there, 'zero' here ..."``). A file that is not a checkpoint
of this format, or whose tensors have other shapes, is refused as well.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from icp_lens.atomic import fault_point
from icp_lens.features import Feature
from icp_lens.model import HookedModel, model_dims
from icp_lens.probeset import ProbeSet

__all__ = ["FORMAT", "SAVE_EVERY_S", "CheckpointState", "fingerprint", "run_meta"]

#: the ``format`` metadata of an ``exact_effects`` checkpoint
FORMAT = "icp_lens.exact_effects/1"
#: least seconds between two periodic saves (the final save is unconditional)
SAVE_EVERY_S = 30.0


class CheckpointState:
    """Partial results and which (chunk, batch) passes are done; saved to / loaded from safetensors.

    With ``path`` None nothing is read or written (a run without ``checkpoint``). If
    ``path`` exists it is loaded, after checking that it was written with the same
    ``meta`` (see :func:`run_meta`) and for tables of the same shapes.
    """

    def __init__(
        self, path: Path | None, meta: dict[str, str], n_features: int, n_examples: int, shape: tuple[int, int]
    ):
        self.path, self.meta = path, meta
        # on the CPU whatever the model's device: each pass's results are moved here, and saved from here
        self.values = torch.full((n_features, n_examples), math.nan, device="cpu")
        self.clean = torch.full((n_examples,), math.nan, device="cpu")
        self.done = torch.zeros(shape, dtype=torch.bool, device="cpu")  # [chunk, batch]
        self.clean_done = torch.zeros(shape[1], dtype=torch.bool, device="cpu")  # [batch]
        self._saved = time.monotonic()
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise ValueError(f"Checkpoint {path} is not a readable exact_effects checkpoint: {err}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an exact_effects checkpoint (format {meta.get('format')!r})")
        for key, want in self.meta.items():
            if meta.get(key) != want:
                got = meta.get(key, "<missing>")
                raise ValueError(
                    f"Checkpoint {path} was written for a different run: {key} is {_short(got)} there, "
                    f"{_short(want)} here. Pass the original arguments to resume, or another checkpoint path."
                )
        if tensors["values"].shape != self.values.shape or tensors["done"].shape != self.done.shape:
            raise ValueError(f"Checkpoint {path} does not fit this run (its tensors have other shapes)")
        self.values, self.clean = tensors["values"], tensors["clean"]
        self.done, self.clean_done = tensors["done"].bool(), tensors["clean_done"].bool()

    def save(self, force: bool = False) -> None:
        """Write the checkpoint (atomically) if ``SAVE_EVERY_S`` has passed since the last save, or ``force``."""
        if self.path is None or (not force and time.monotonic() - self._saved < SAVE_EVERY_S):
            return
        from safetensors.torch import save_file

        tensors = {"values": self.values, "clean": self.clean, "done": self.done.to(torch.uint8)}
        tensors["clean_done"] = self.clean_done.to(torch.uint8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT, **self.meta})
        fault_point("score-checkpoint:before-replace")
        os.replace(tmp, self.path)  # atomic: an interrupted save leaves the previous checkpoint
        self._saved = time.monotonic()
        fault_point("score-checkpoint:after-save")


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def fingerprint(model: HookedModel, probes: ProbeSet) -> tuple[str, str]:
    """Short digests of the model's weights and of the probe set, to refuse resuming on other ones."""
    total = sum(p.detach().double().abs().sum().item() for p in model.parameters())
    model_fp = f"{type(model).__name__}:{model_dims(model)}:{total:.12e}"
    probes_fp = hashlib.sha256(
        json.dumps([asdict(e) for e in probes.examples], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    return hashlib.sha256(model_fp.encode()).hexdigest()[:16], probes_fp


def run_meta(
    model: HookedModel,
    probes: ProbeSet,
    features: Sequence[Feature],
    *,
    intervention: str,
    metric: str,
    positions: tuple[int, ...] | None,
    batch_size: int,
    features_per_pass: int,
    plan: Sequence[Sequence[int]] | None = None,
) -> dict[str, str]:
    """The checkpoint metadata describing a run: a resumed run must match every entry.

    ``plan`` lists the feature indices of each chunk (one chunk per patched pass); it is
    recorded as a digest, since the chunks also depend on the model class and the device.
    The keys are checked in this order, so a mismatch is reported on the first that differs.
    """
    model_fp, probes_fp = fingerprint(model, probes)
    meta = {
        "features": json.dumps([str(f) for f in features]),
        "intervention": intervention,
        "metric": metric,
        "positions": json.dumps(positions),
        "batch_size": str(batch_size),
        "features_per_pass": str(features_per_pass),
    }
    if plan is not None:
        chunks = json.dumps([[int(i) for i in chunk] for chunk in plan])
        meta["plan"] = f"{len(plan)} chunks, " + hashlib.sha256(chunks.encode()).hexdigest()[:16]
    return {**meta, "model": model_fp, "probes": probes_fp}

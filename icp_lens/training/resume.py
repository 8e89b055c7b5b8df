"""Saving and restoring a run, so that an interrupted run resumes to the same weights.

A checkpoint (written by :mod:`icp_lens.training.checkpoint`: safetensors plus JSON,
replaced atomically) carries everything the next step depends on: the trainable weights,
the AdamW state, the schedule, the loop state (step, early-stopping state, best weights,
JTT error set, the regularised features as re-scoring grew them), the objective's state
(GroupDRO weights), the fitted means and the history so far.

It also carries the run's *identity* (config, features, pruned features, the sizes of the
training, pair and retain pools, and sha256 digests of the base model's weights and of
each data set's content). Resuming compares it with the resuming trainer's and refuses a checkpoint from other
settings: continuing somebody else's optimiser state would silently train a different
model. Together with the seeding (data order from ``(seed, epoch)``, per-step sampling
from ``(seed, step)``), this makes ``fit(resume=True)`` end with the weights of an
uninterrupted run.

Under a process group (:mod:`icp_lens.training.ddp`) rank 0 writes the checkpoints and
every rank resumes from the same one.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from icp_lens.distributed import barrier, is_main
from icp_lens.features import Feature
from icp_lens.interventions import Mean
from icp_lens.training import checkpoint as ckpt
from icp_lens.training.config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.training.trainer import Trainer

__all__ = ["ResumeMixin"]

_WHAT = {
    "model_sha256": "the base model's weights are not the same, another --model",
    "train_sha256": "the training examples are not the same, another --train",
    "pair_sha256": "the pair examples are not the same, another --pairs",
    "retain_sha256": "the retain texts are not the same, another --retain",
    "val_sha256": "the validation examples are not the same, another --val",
}


def _detail(key: str, saved: Any, mine: Any) -> str:
    """What differs, for a person: the config fields, the data named by option, or the values."""
    if key in _WHAT:
        return _WHAT[key]
    if isinstance(saved, dict) and isinstance(mine, dict):
        names = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        return ", ".join(f"{k} {saved.get(k)!r} there, {mine.get(k)!r} here" for k in names[:4])
    return f"{saved!r} there, {mine!r} here"


def _data_digest(data: Any) -> str:
    """sha256 of a data set's examples (probe examples as JSON, texts as they are)."""
    import hashlib
    import json
    from dataclasses import asdict, is_dataclass

    items = getattr(data, "examples", None)
    if items is None:
        items = getattr(data, "texts", None)
    if items is None:
        items = [repr(data)]
    rows = [asdict(x) if is_dataclass(x) and not isinstance(x, type) else x for x in items]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


class ResumeMixin:
    """``Trainer``'s checkpoint methods."""

    def _identity(self: Trainer) -> dict[str, Any]:
        """What must match for a checkpoint to belong to this run (``progress`` may differ)."""
        config = self.config.to_dict()
        config.pop("progress")
        return {
            "config": config,
            "features": [str(f) for f in self.features],
            "prune": [] if self.plan is None else [str(f) for f in self.plan.features],
            "n_train": len(self.train_data),
            "n_pairs": 0 if self.pair_data is None else len(self.pair_data),
            "n_retain": 0 if self.retain_data is None else len(self.retain_data),
            **self._digests(),
        }

    def _digests(self: Trainer) -> dict[str, str]:
        """Digests of the base model's weights and of the train / pair / retain / val data (computed once)."""
        cached = getattr(self, "_digest_cache", None)
        if cached is None:
            from icp_lens.pruning.plan import fingerprint

            cached = {"model_sha256": fingerprint(self.base).weights_sha256}
            for name in ("train", "pair", "retain", "val"):
                data = getattr(self, f"{name}_data", None)
                if data is not None:
                    cached[f"{name}_sha256"] = _data_digest(data)
            self._digest_cache = cached
        return dict(cached)

    def _save(
        self: Trainer,
        s: dict[str, Any],
        opt: torch.optim.Optimizer,
        sched: Any,
        best: dict[str, Tensor] | None,
        means: dict[Feature, Mean],
    ) -> None:
        """Write a checkpoint of the loop state ``s``, the optimiser, the schedule and the means.

        Under a process group rank 0 writes it (every rank holds the same state) and the
        others wait for it, so a resumed run of any rank finds the same checkpoint.
        """
        if not is_main():
            barrier()
            return
        state = {**self._identity(), "loop": s, "objective_state": self.loss.state_dict(),
                 "scheduler": sched.state_dict(), "history": self._history}  # fmt: skip
        mean_tensors = {str(f): m.value for f, m in means.items()}
        trainable = {k: v for k, v in self.trainable.items()}
        try:
            ckpt.save_checkpoint(self.checkpoint_dir, state, trainable, opt.state_dict(), best=best, means=mean_tensors)
        finally:  # the others are waiting: release them even when the save fails (torchrun then stops the group)
            barrier()

    def _restore(
        self: Trainer, opt: torch.optim.Optimizer, sched: Any
    ) -> tuple[dict[str, Any], dict[str, Tensor] | None, dict[Feature, Mean]]:
        """Load the checkpoint into the weights, ``opt`` and ``sched``; returns (loop state, best weights, means)."""
        saved = ckpt.load_checkpoint_state(self.checkpoint_dir)
        state = saved["state"]
        mine = self._identity()
        # a checkpoint written before a TrainConfig field existed ran with that field's default
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        saved_config = state.get("config") or {}
        state["config"] = {**{k: v for k, v in mine["config"].items() if k not in saved_config and
                              v == (list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k])},
                           **saved_config}  # fmt: skip
        state.setdefault("n_retain", 0)
        for key in mine:
            if key.endswith("_sha256") and key not in state:
                continue  # written before digests were recorded: the sizes above still have to match
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"The checkpoint in {self.checkpoint_dir} is from another run ({key} differs: "
                    f"{_detail(key, state.get(key), mine[key])}); resume with the same model, data and settings, "
                    "or start afresh without --resume (or with another checkpoint_dir)"
                )
        self._load_trainable(saved["trainable"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(state["scheduler"])
        self.loss.load_state_dict(state["objective_state"])
        self._history = list(state["history"])
        means = {Feature.parse(k): Mean(v) for k, v in (saved["means"] or {}).items()}
        return state["loop"], saved["best"], means

    @torch.no_grad()
    def _load_trainable(self: Trainer, weights: dict[str, Tensor]) -> None:
        """Copy ``weights`` (name -> tensor, e.g. the best weights) into the trainable parameters."""
        missing = sorted(set(self.trainable) - set(weights))
        if missing:
            raise KeyError(f"Saved weights lack {missing[:3]}")
        for name, p in self.trainable.items():
            p.copy_(weights[name].to(p.device, p.dtype))

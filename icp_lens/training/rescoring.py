"""Re-scoring during training: follow a shortcut that moves to other features.

Regularising the flagged features can push the model to carry the spurious signal
through other features instead. With ``TrainConfig.rescore_every=N`` the trainer scores
the features again every ``N`` steps (from step 0): gradient attribution on the probe
pairs, with the pruned features ablated and excluded, and adds the ``rescore_top_k``
highest to the regularised set. The set only grows (a union), so nothing regularised
before is dropped; features that join get fitted means when the ``mean`` intervention is
in use. Each re-scoring logs a ``kind="rescore"`` history row, and the current feature
list lives in the loop state, so checkpoints resume with it.

The probe set is ``probes=`` when given, else the pair pool, else up to 256 training
examples with spurious counterfactuals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from icp_lens.features import Feature
from icp_lens.interventions import Mean
from icp_lens.training.data import read_examples

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.probeset import ProbeSet
    from icp_lens.training.trainer import Trainer

__all__ = ["RescoreMixin"]


class RescoreMixin:
    """``Trainer``'s re-scoring methods."""

    def _probe_set(self: Trainer, probes: Any) -> ProbeSet:
        """The examples re-scoring runs on, as a ``ProbeSet`` (they need spurious counterfactuals)."""
        from icp_lens.probeset import ProbeSet

        if probes is not None:
            examples = read_examples(probes, self.tokenizer)
        elif self.pair_data is not None and self._pairs_always:
            examples = list(self.pair_data.examples)
        else:
            examples = [ex for ex in self.train_data.examples if ex.spurious_counterfactual is not None][:256]
        if not examples or any(ex.spurious_counterfactual is None for ex in examples):
            raise ValueError("Re-scoring needs probe examples with spurious counterfactuals (probes=...)")
        return ProbeSet(self.model, examples, cf_length="right")

    def _rescore(self: Trainer, s: dict[str, Any], means: dict[Feature, Mean], step: int) -> None:
        """Score features on the current model and add the top ones to the regularised set."""
        from icp_lens.pruning import select_features
        from icp_lens.scoring import score

        cfg = self.config
        self.model.eval()
        with self.pruned():
            table = score(self.model, self._rescore_probes, method="attribution", kinds=cfg.rescore_kinds,
                          causal=False, progress=False, n_boot=0)  # fmt: skip
        self.model.train()
        pruned = set(self.plan.features) if self.plan is not None else set()
        frame = table.frame
        frame = frame[[f not in pruned for f in table.features]]
        k = cfg.rescore_top_k or max(1, len(self.features))
        current = [Feature.parse(f) for f in s["features"]]
        added = [f for f in select_features(frame, top_k=k) if f not in current]
        s["features"] = [str(f) for f in current + added]
        self.loss.features = tuple(current + added)
        if added and "mean" in cfg.interventions:
            means.update(self._fit_means(added))
        self._history.append({"step": step, "epoch": step / self.train_data.n_batches(cfg.batch_size),
                              "kind": "rescore", "n_features": len(s["features"]),
                              "added": ",".join(str(f) for f in added)})  # fmt: skip

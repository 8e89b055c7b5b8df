"""The trainer: fine-tune a model so that its output stops depending on flagged features.

Stage 2, approach 2 of the method. Instead of deleting a spurious feature (which can
also delete something the real task needs), train with ``L = L_task + lam * L_inv`` so
the output becomes invariant to interventions on it, keeping the model's capacity::

    from icp_lens.training import TrainConfig, Trainer

    features = table.select(top_k=8)                        # from icp_lens.scoring.score
    trainer = Trainer("runs/lexical/model", "runs/lexical/train.jsonl",
                      TrainConfig(objective="invariance", lam=1.0, epochs=1, lora=True),
                      features=features, val="runs/lexical/probe.jsonl")
    result = trainer.fit()                                  # history: result.history
    trainer.export("runs/invariant")                        # merged, verified HF checkpoint

*How it runs.* The model is a fresh copy of the source (an HF checkpoint directory, an
HF model or a ``TransformerBridge``; the source is never modified), optionally with
LoRA adapters injected by peft (:mod:`icp_lens.training.lora`), inside a
``TransformerBridge``: hook-point interventions run on it and gradients flow to the HF
parameters. Each step computes the objective's terms from one stacked forward pass
(:mod:`icp_lens.training.objectives`; the intervened rows of the invariance term branch
off the clean rows, :mod:`icp_lens.training.branch`), then AdamW (weight decay on matrices only),
gradient clipping and a linear-warm-up + cosine schedule
(``transformers.get_cosine_schedule_with_warmup``).

*Hybrid.* ``prune=`` features (or a ``PrunePlan``) are removed for the whole run: a
``PrunePlan`` is made on the original model (its means fixed there in mean mode), its
hook edits are active in every forward pass, and :meth:`Trainer.export` bakes the same
plan into the trained weights, so the exported checkpoint computes exactly what was
trained (verified). Pruning the extreme features and regularising the moderate ones is
``hybrid_split`` + ``Trainer(..., features=split.regularise, prune=split.prune)``.

*Why not the HF ``Trainer``.* It would bring logging, checkpointing and schedules, but
its checkpoints call ``save_pretrained`` on the bridge-wrapped model (which fails: the
bridge's split q/k/v views share storage), its data collator pads (icp_lens never pads),
and the invariance terms need several stacked, hooked forward passes per step plus
state (GroupDRO weights, JTT error set, fitted means) that its checkpoints do not carry.
Only the schedule is reused; the loop, checkpoints and early stopping are here.

*Determinism and resume.* The data order of epoch ``e`` comes from ``(seed, e)``, the
per-step sampling (features, interventions, dropout) from ``(seed, step)``, so a run
resumed from a checkpoint (:mod:`icp_lens.training.checkpoint`) ends with the same
weights as an uninterrupted one.

*Where the pieces live.* This module builds a trainer (model copy, LoRA, data, pruning
plan, requirement checks, fitted means); the class gathers its other concepts from one
module each: the loop (:mod:`~icp_lens.training.loop`), model selection and early
stopping (:mod:`~icp_lens.training.selection`), re-scoring
(:mod:`~icp_lens.training.rescoring`), saving and resuming
(:mod:`~icp_lens.training.resume`), the HF export (:mod:`~icp_lens.training.export`),
the result (:mod:`~icp_lens.training.result`) and the one-call :func:`train`
(:mod:`~icp_lens.training.run`). Every public name stays importable from here.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from icp_lens.edits import intervene
from icp_lens.features import Feature
from icp_lens.interventions import Mean, means_over
from icp_lens.probes import ProbeExample
from icp_lens.pruning.ablate import plan_edits
from icp_lens.pruning.plan import PrunePlan
from icp_lens.training.config import DEFAULT_LAMBDA, STOP_METRICS, StopMetric, TrainConfig
from icp_lens.training.data import RetainData, TrainData, read_examples, read_texts
from icp_lens.training.evaluate import evaluate_data
from icp_lens.training.export import ExportMixin
from icp_lens.training.fused import fused_qkv_sites
from icp_lens.training.loop import LoopMixin
from icp_lens.training.objectives import (
    BatchLoss,
    needs_counterfactuals,
    needs_features,
    needs_groups,
    term_weights,
)
from icp_lens.training.rescoring import RescoreMixin
from icp_lens.training.result import TrainResult
from icp_lens.training.resume import ResumeMixin
from icp_lens.training.run import train
from icp_lens.training.selection import SelectionMixin

__all__ = [
    "DEFAULT_LAMBDA",
    "StopMetric",
    "STOP_METRICS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "train",
    "evaluate_data",
    "read_examples",
    "boot_around",
]


def boot_around(hf: nn.Module, tokenizer: Any, device: Any) -> Any:
    """A TransformerBridge around ``hf`` (config and tokenizer written to a temporary directory)."""
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as tmp:
        hf.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bridge = TransformerBridge.boot_transformers(tmp, hf_model=hf, tokenizer=tokenizer, device=device)
    return bridge


class Trainer(LoopMixin, SelectionMixin, RescoreMixin, ResumeMixin, ExportMixin):
    """Fine-tune a copy of ``model`` on ``train`` (probe-format examples or a JSONL path).

    ``features`` are the features to regularise, ``prune`` the ones to remove for good
    (features or a ``PrunePlan`` made on ``model``), ``val`` the validation examples
    (evaluated every ``eval_every`` steps, used for early stopping). ``pairs`` is an
    optional pool of examples with spurious counterfactuals (it can be small, e.g. the
    probe set the features were scored on): when given, every step draws a batch from it
    for the pair terms (invariance, consistency, ...), while the task loss runs on
    ``train``, which then needs no counterfactuals. ``checkpoint_dir`` is where
    resumable checkpoints go. ``probes`` are the examples re-scoring runs on
    (``rescore_every``; default: ``pairs``, else up to 256 training examples with
    counterfactuals). ``tokenizer`` is needed only for a plain HF model.

    ``retain`` is a pool of ordinary text (strings, ``ProbeExample`` prompts, or a
    ``.txt`` / ``.jsonl`` file; :func:`~icp_lens.training.data.read_texts`) for the retain
    term of ``TrainConfig.retain_weight``: every step adds ``retain_weight * KL(p_orig ||
    p_theta)`` of the next-token distributions on a batch of it (``retain`` in the
    history). Use text the evaluation never reads (e.g. other reviews than the ones
    perplexity is measured on). It needs ``retain_weight > 0`` and vice versa.

    ``fit`` trains (:mod:`~icp_lens.training.loop`; ``train_step`` is one step),
    ``evaluate`` / ``history`` report (:mod:`~icp_lens.training.selection`), ``export``
    writes the verified HF checkpoint (:mod:`~icp_lens.training.export`).
    """

    def __init__(
        self,
        model: Any,
        train: str | Path | Sequence[ProbeExample],
        config: TrainConfig | None = None,
        *,
        features: Sequence[Feature | str] = (),
        prune: Sequence[Feature | str] | PrunePlan = (),
        val: str | Path | Sequence[ProbeExample] | None = None,
        pairs: str | Path | Sequence[ProbeExample] | None = None,
        probes: str | Path | Sequence[ProbeExample] | None = None,
        retain: str | Path | Sequence[str | ProbeExample] | None = None,
        checkpoint_dir: str | Path | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
    ) -> None:
        from icp_lens.pruning.source import clean_hf_model, load_tokenizer

        self.config = config = config or TrainConfig()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        if self.tokenizer is None:
            raise ValueError("A plain HF model needs tokenizer=...")
        self.features = tuple(Feature.parse(f) if isinstance(f, str) else f for f in features)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.base = clean_hf_model(model)  # the original weights (LoRA merge base, plan fingerprint)
        hf = copy.deepcopy(self.base)
        if config.dropout is not None:
            for module in hf.modules():
                if isinstance(module, nn.Dropout):
                    module.p = config.dropout
        self.lora = None
        if config.lora:
            from icp_lens.training.lora import add_lora

            self.lora = add_lora(hf, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                 targets=config.lora_targets, seed=config.seed)  # fmt: skip
            hf = self.lora.hf_model
        self.device = device
        self.model = boot_around(hf, self.tokenizer, device)
        self.model.eval()
        self._hf = hf
        self.trainable = self._trainable_parameters()
        self._fused = [] if self.lora is not None else fused_qkv_sites(self.model)
        self.train_data = TrainData(self.model, read_examples(train, self.tokenizer))
        self.val_data = TrainData(self.model, read_examples(val, self.tokenizer)) if val is not None else None
        self.pair_data, self._pairs_always = None, pairs is not None
        if pairs is not None:
            with_cf = [ex for ex in read_examples(pairs, self.tokenizer) if ex.spurious_counterfactual is not None]
            if not with_cf:
                raise ValueError("pairs=... holds no example with a spurious_counterfactual")
            self.pair_data = TrainData(self.model, with_cf)
        elif 0 < self.train_data.n_with_spurious < len(self.train_data) and self._uses_pairs():
            # batches without counterfactuals take their pair terms from the training examples that have them
            self.pair_data = TrainData(
                self.model, [ex for ex in self.train_data.examples if ex.spurious_counterfactual is not None]
            )
        if (retain is None) != (config.retain_weight == 0):
            raise ValueError(
                "The retain term needs both a text pool and a weight: pass retain=... (ordinary text) together with "
                f"TrainConfig(retain_weight > 0); got retain={'None' if retain is None else '...'} and "
                f"retain_weight={config.retain_weight}"
            )
        if config.pair_batch_size is not None and self.pair_data is None:
            raise ValueError(
                "pair_batch_size sizes the batches of the pair pool, and this run has none: pass pairs=... (examples "
                "with a spurious_counterfactual) or leave pair_batch_size=None"
            )
        self.retain_data = None if retain is None else RetainData(self.model, read_texts(retain), config.retain_tokens)
        self._reference: nn.Module | None = None  # full fine-tuning's frozen original for the retain term
        self.plan = self._make_plan(prune)
        self._check_requirements()
        self._rescore_probes = self._probe_set(probes) if config.rescore_every else None
        self.loss = BatchLoss(self.model, config, features=self.features, n_groups=len(self.train_data.groups))
        self._history: list[dict[str, Any]] = []

    # -- set-up -----------------------------------------------------------------------
    def _trainable_parameters(self) -> dict[str, nn.Parameter]:
        if self.lora is not None:
            params = self.lora.parameters()
            keep = {id(p) for p in params.values()}
            for p in self._hf.parameters():  # the bridge adds split q/k/v parameters: freeze them too
                p.requires_grad_(id(p) in keep)
            return params
        out: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for name, p in self._hf.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[name] = p
        return out

    def _make_plan(self, prune: Sequence[Feature | str] | PrunePlan) -> PrunePlan | None:
        if isinstance(prune, PrunePlan):
            prune.check(self.base)
            return prune
        feats = [Feature.parse(f) if isinstance(f, str) else f for f in prune]
        if not feats:
            return None
        overlap = sorted(set(feats) & set(self.features))
        if overlap:
            raise ValueError(f"Features cannot be both pruned and regularised: {overlap[:5]}")
        from icp_lens.pruning import make_plan

        reference = [ex.prompt for ex in self.train_data.examples[: self.config.mean_reference_size]]
        mode = self.config.prune_mode
        return make_plan(
            self.model, feats, mode=mode, reference=reference if mode == "mean" else None, hf=self.base,
            tokenizer=self.tokenizer, description="training prompts", stage="pruned, then trained",
            objective=self.config.objective,
        )  # fmt: skip

    def _uses_pairs(self) -> bool:
        weights = term_weights(self.config.objective, self.config.lam, self.config.extra_terms)
        resample = "invariance" in weights and "resample" in self.config.interventions
        return resample or any(t in weights for t in ("consistency", "contrastive", "cda", "clp"))

    def _check_requirements(self) -> None:
        cfg, data = self.config, self.train_data
        weights = term_weights(cfg.objective, cfg.lam, cfg.extra_terms)
        has_cf = data.n_with_spurious > 0 or self.pair_data is not None
        if needs_features(weights, has_cf) and not self.features:
            raise ValueError(
                f"Objective {cfg.objective!r} regularises flagged features: pass features=... "
                "(e.g. select_features(scores, top_k=K); CLI: --scores FILE --top-k K)"
            )
        if needs_counterfactuals(weights) and not has_cf:
            raise ValueError(f"Objective {cfg.objective!r} needs training examples with a spurious_counterfactual")
        if "invariance" in weights and cfg.interventions == ("resample",) and not has_cf:
            raise ValueError(
                "The 'resample' intervention takes each feature's value on the spurious counterfactual, and no "
                "training example has one: use interventions=('mean',), ('zero',) or ('resample_batch',)"
            )
        if needs_groups(cfg.objective) and not data.has_groups:
            raise ValueError("GroupDRO needs group labels: give the training examples a 'group'")
        if cfg.early_stopping is not None and self.val_data is None:
            raise ValueError("early_stopping needs validation data (val=...)")
        if cfg.early_stopping == "worst_group_accuracy" and self.val_data is not None and not self.val_data.has_groups:
            raise ValueError("early stopping on worst_group_accuracy needs validation examples with a 'group'")

    @contextmanager
    def pruned(self) -> Iterator[Any]:
        """The plan's features ablated (hook edits) for the forward passes in the block."""
        if self.plan is None or not self.plan.features:
            yield self.model
            return
        with intervene(self.model, plan_edits(self.plan)):
            yield self.model

    def _fit_means(self, features: Sequence[Feature] | None = None) -> dict[Feature, Mean]:
        features = self.features if features is None else features
        if "mean" not in self.config.interventions or not features:
            return {}
        n = self.config.mean_reference_size
        batches = (b.tokens for i, b in enumerate(self.train_data.batches(256)) if i * 256 < n)
        with self.pruned():
            return means_over(self.model, list(features), batches)

    def _jtt_errors(self) -> Tensor:
        """Training examples the starting model gets wrong (JTT's error set)."""
        errors = torch.zeros(len(self.train_data), dtype=torch.bool, device="cpu")  # like the data's weights
        from icp_lens.training.losses import candidate_logits

        with torch.no_grad(), self.pruned():
            self.model.eval()
            for b in self.train_data.batches(256):
                pred = candidate_logits(self.model(b.tokens)[:, -1], b.candidates).argmax(-1)
                errors[b.index] = (pred != 0).cpu()
        return errors

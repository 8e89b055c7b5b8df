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
(:mod:`icp_lens.training.objectives`), then AdamW (weight decay on matrices only),
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
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from icp_lens.edits import intervene
from icp_lens.features import Feature
from icp_lens.interventions import Mean, means_over
from icp_lens.probes import ProbeExample, read_probes
from icp_lens.pruning.ablate import plan_edits
from icp_lens.pruning.plan import PrunePlan
from icp_lens.training import checkpoint as ckpt
from icp_lens.training.config import DEFAULT_LAMBDA, HIGHER_IS_BETTER, STOP_METRICS, StopMetric, TrainConfig
from icp_lens.training.data import TrainData
from icp_lens.training.evaluate import evaluate_data
from icp_lens.training.fused import fused_qkv_sites, sync_fused_qkv
from icp_lens.training.objectives import (
    BatchLoss,
    needs_counterfactuals,
    needs_features,
    needs_groups,
    term_weights,
)

__all__ = [
    "DEFAULT_LAMBDA",
    "StopMetric",
    "STOP_METRICS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "train",
    "evaluate_data",
]


@dataclass(frozen=True)
class TrainResult:
    """What a run did: the history (one row per log / evaluation), the end state, timings."""

    history: pd.DataFrame = field(repr=False)
    steps: int
    total_steps: int
    best_step: int | None
    best_metric: float | None
    stopped_early: bool
    final: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def _examples(data: str | Path | Sequence[ProbeExample], tokenizer: Any) -> list[ProbeExample]:
    if isinstance(data, (str, Path)):
        return read_probes(data, tokenizer=tokenizer)
    return list(data)


def _boot(hf: nn.Module, tokenizer: Any, device: Any) -> Any:
    """A TransformerBridge around ``hf`` (config and tokenizer written to a temporary directory)."""
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as tmp:
        hf.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bridge = TransformerBridge.boot_transformers(tmp, hf_model=hf, tokenizer=tokenizer, device=device)
    return bridge


class Trainer:
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
        self.model = _boot(hf, self.tokenizer, device)
        self.model.eval()
        self._hf = hf
        self.trainable = self._trainable_parameters()
        self._fused = [] if self.lora is not None else fused_qkv_sites(self.model)
        self.train_data = TrainData(self.model, _examples(train, self.tokenizer))
        self.val_data = TrainData(self.model, _examples(val, self.tokenizer)) if val is not None else None
        self.pair_data, self._pairs_always = None, pairs is not None
        if pairs is not None:
            with_cf = [ex for ex in _examples(pairs, self.tokenizer) if ex.spurious_counterfactual is not None]
            if not with_cf:
                raise ValueError("pairs=... holds no example with a spurious_counterfactual")
            self.pair_data = TrainData(self.model, with_cf)
        elif 0 < self.train_data.n_with_spurious < len(self.train_data) and self._uses_pairs():
            # batches without counterfactuals take their pair terms from the training examples that have them
            self.pair_data = TrainData(
                self.model, [ex for ex in self.train_data.examples if ex.spurious_counterfactual is not None]
            )
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

    def _probe_set(self, probes: Any) -> Any:
        from icp_lens.probeset import ProbeSet

        if probes is not None:
            examples = _examples(probes, self.tokenizer)
        elif self.pair_data is not None and self._pairs_always:
            examples = list(self.pair_data.examples)
        else:
            examples = [ex for ex in self.train_data.examples if ex.spurious_counterfactual is not None][:256]
        if not examples or any(ex.spurious_counterfactual is None for ex in examples):
            raise ValueError("Re-scoring needs probe examples with spurious counterfactuals (probes=...)")
        return ProbeSet(self.model, examples, cf_length="right")

    def _rescore(self, s: dict[str, Any], means: dict[Feature, Mean], step: int) -> None:
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
    def pruned(self):
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
        errors = torch.zeros(len(self.train_data), dtype=torch.bool)
        from icp_lens.training.losses import candidate_logits

        with torch.no_grad(), self.pruned():
            self.model.eval()
            for b in self.train_data.batches(256):
                pred = candidate_logits(self.model(b.tokens)[:, -1], b.candidates).argmax(-1)
                errors[b.index] = (pred != 0).cpu()
        return errors

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, data: TrainData | str | Path | Sequence[ProbeExample] | None = None) -> dict[str, Any]:
        """Validation metrics of the current model (pruned features ablated)."""
        if data is None:
            if self.val_data is None:
                raise ValueError("No validation data: pass data=... or give the trainer val=...")
            data = self.val_data
        elif not isinstance(data, TrainData):
            data = TrainData(self.model, _examples(data, self.tokenizer))
        with self.pruned():
            return evaluate_data(self.model, data)

    @property
    def history(self) -> pd.DataFrame:
        """One row per log (``kind="train"``: mean loss terms, lr, grad norm) or evaluation (``"val"``)."""
        return pd.DataFrame(self._history)

    # -- the loop ---------------------------------------------------------------------
    def _optimizer(self, total: int) -> tuple[torch.optim.Optimizer, Any]:
        from transformers import get_cosine_schedule_with_warmup

        decay = [p for p in self.trainable.values() if p.ndim >= 2]
        no_decay = [p for p in self.trainable.values() if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr)
        warmup = int(self.config.warmup_ratio * total)
        return opt, get_cosine_schedule_with_warmup(opt, warmup, total)

    def _step_seed(self, step: int) -> int:
        return (self.config.seed * 1_000_003 + step * 7_919 + 12_345) % (2**63)

    def fit(self, *, resume: bool = False, callback: Callable[[Trainer, int], None] | None = None) -> TrainResult:
        """Train; ``resume`` continues from ``checkpoint_dir`` when it holds a checkpoint.

        ``callback(trainer, step)`` runs after every step (raise to stop; a later
        ``fit(resume=True)`` continues from the last checkpoint).
        """
        from tqdm.auto import tqdm

        cfg = self.config
        start_time = time.perf_counter()
        per_epoch = self.train_data.n_batches(cfg.batch_size)
        total = min(cfg.max_steps, cfg.epochs * per_epoch) if cfg.max_steps else cfg.epochs * per_epoch
        eval_every = cfg.eval_every or per_epoch
        ckpt_every = cfg.checkpoint_every or eval_every
        opt, sched = self._optimizer(total)
        s: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "stopped_early": False,
                             "running": {}, "n_running": 0, "jtt_errors": None,
                             "features": [str(f) for f in self.features]}  # fmt: skip
        best_weights: dict[str, Tensor] | None = None
        if resume and ckpt.has_checkpoint(self.checkpoint_dir):
            s, best_weights, means = self._restore(opt, sched)
        else:
            self._history = []
            means = self._fit_means()
            if cfg.objective == "jtt":
                s["jtt_errors"] = self._jtt_errors().nonzero().flatten().tolist()
            if self.val_data is not None:
                self._history.append({"step": 0, "epoch": 0.0, "kind": "val", **self.evaluate()})
        self.loss.means = means
        self.loss.features = tuple(Feature.parse(f) for f in s["features"])
        data = self.train_data
        if s["jtt_errors"] is not None:
            from icp_lens.training.losses import jtt_weights

            errors = torch.zeros(len(data), dtype=torch.bool)
            errors[s["jtt_errors"]] = True
            data = data.with_weights(jtt_weights(errors, cfg.jtt_upweight))
        params = list(self.trainable.values())
        bar = tqdm(total=total, initial=s["step"], disable=not cfg.progress, desc=f"train ({cfg.objective})")
        epoch_batches: tuple[int, list] = (-1, [])
        self.model.train()  # once: switching modes walks the bridge's whole module tree
        try:
            while s["step"] < total and not s["stopped_early"]:
                step = s["step"]
                if cfg.rescore_every and step % cfg.rescore_every == 0 and s.get("rescored") != step:
                    self._rescore(s, means, step)
                    s["rescored"] = step
                epoch, i = divmod(step, per_epoch)
                if epoch_batches[0] != epoch:
                    epoch_batches = (epoch, data.epoch(epoch, cfg.batch_size, seed=cfg.seed))
                batch = epoch_batches[1][i].to(_device(self.model))
                pair_batch = self._pair_batch(step) if self._pairs_always or batch.spurious is None else None
                tic = time.perf_counter()
                with torch.random.fork_rng(devices=[]), self.pruned(), torch.enable_grad():
                    torch.manual_seed(self._step_seed(step))
                    gen = torch.Generator().manual_seed(self._step_seed(step))
                    terms = self.loss(batch, gen, pair_batch)
                    opt.zero_grad(set_to_none=True)
                    terms["loss"].backward()
                self._check_gradients(step)
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
                opt.step()
                sched.step()
                s["step"] = step = step + 1
                run = s["running"]
                for name, value in terms.items():
                    run[name] = run.get(name, 0.0) + float(value.detach())
                run["grad_norm"] = run.get("grad_norm", 0.0) + float(norm)
                run["seconds"] = run.get("seconds", 0.0) + time.perf_counter() - tic
                s["n_running"] += 1
                if step % cfg.log_every == 0 or step == total:
                    row = {k: v / s["n_running"] for k, v in run.items()}
                    row["seconds"] = run["seconds"]
                    self._history.append({"step": step, "epoch": step / per_epoch, "kind": "train",
                                          "lr": sched.get_last_lr()[0], **row})  # fmt: skip
                    s["running"], s["n_running"] = {}, 0
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                if self.val_data is not None and (step % eval_every == 0 or step == total):
                    best_weights = self._evaluate_and_track(s, best_weights, step, per_epoch)
                if self.checkpoint_dir is not None and (step % ckpt_every == 0 or step == total):
                    self._save(s, opt, sched, best_weights, means)
                bar.update(1)
                if callback is not None:
                    callback(self, step)
        finally:
            bar.close()
            self.model.eval()
        if best_weights is not None and cfg.early_stopping and cfg.restore_best:
            self._load_trainable(best_weights)
        final = self.evaluate() if self.val_data is not None else {}
        return TrainResult(
            history=self.history, steps=s["step"], total_steps=total, best_step=s["best_step"],
            best_metric=s["best"], stopped_early=s["stopped_early"], final=final,
            seconds=time.perf_counter() - start_time,
        )  # fmt: skip

    def _pair_batch(self, step: int) -> Any:
        """Batch ``step`` of the pair pool's endless, seeded stream (``None`` without a pool)."""
        if self.pair_data is None:
            return None
        bs = self.config.batch_size
        epoch, i = divmod(step, self.pair_data.n_batches(bs))
        if getattr(self, "_pair_epoch", (None,))[0] != epoch:
            self._pair_epoch = (epoch, self.pair_data.epoch(epoch, bs, seed=self.config.seed + 1))
        return self._pair_epoch[1][i].to(_device(self.model))

    def _check_gradients(self, step: int) -> None:
        if step != 0 and self.lora is None:
            return
        if self.lora is not None:
            from icp_lens.training.lora import dead_adapters

            dead = dead_adapters(self.lora) if step == 0 else []
            if dead:
                raise RuntimeError(
                    f"LoRA layers {dead[:4]} received no gradient: the bridge does not run these modules. "
                    "Exclude them from lora_targets."
                )

    def _evaluate_and_track(self, s: dict[str, Any], best: dict[str, Tensor] | None, step: int, per_epoch: int):
        cfg = self.config
        metrics = self.evaluate()
        self._history.append({"step": step, "epoch": step / per_epoch, "kind": "val", **metrics})
        if cfg.early_stopping is None:
            return best
        value = metrics[cfg.early_stopping]
        if value is None:
            raise ValueError(f"Validation metric {cfg.early_stopping!r} is undefined on the validation data")
        sign = 1.0 if HIGHER_IS_BETTER[cfg.early_stopping] else -1.0
        if s["best"] is None or sign * (value - s["best"]) > cfg.min_delta:
            s["best"], s["best_step"], s["bad_evals"] = value, step, 0
            return {k: v.detach().clone() for k, v in self.trainable.items()}
        s["bad_evals"] += 1
        if s["bad_evals"] >= cfg.patience:
            s["stopped_early"] = True
        return best

    # -- checkpoints ------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        config = self.config.to_dict()
        config.pop("progress")
        return {
            "config": config,
            "features": [str(f) for f in self.features],
            "prune": [] if self.plan is None else [str(f) for f in self.plan.features],
            "n_train": len(self.train_data),
            "n_pairs": 0 if self.pair_data is None else len(self.pair_data),
        }

    def _save(self, s, opt, sched, best, means: dict[Feature, Mean]) -> None:
        state = {**self._identity(), "loop": s, "objective_state": self.loss.state_dict(),
                 "scheduler": sched.state_dict(), "history": self._history}  # fmt: skip
        mean_tensors = {str(f): m.value for f, m in means.items()}
        trainable = {k: v for k, v in self.trainable.items()}
        ckpt.save_checkpoint(self.checkpoint_dir, state, trainable, opt.state_dict(), best=best, means=mean_tensors)

    def _restore(self, opt, sched) -> tuple[dict[str, Any], dict[str, Tensor] | None, dict[Feature, Mean]]:
        saved = ckpt.load_checkpoint_state(self.checkpoint_dir)
        state = saved["state"]
        mine = self._identity()
        for key in mine:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"The checkpoint in {self.checkpoint_dir} is from another run ({key} differs); "
                    "resume with the same settings or use another checkpoint_dir"
                )
        self._load_trainable(saved["trainable"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(state["scheduler"])
        self.loss.load_state_dict(state["objective_state"])
        self._history = list(state["history"])
        means = {Feature.parse(k): Mean(v) for k, v in (saved["means"] or {}).items()}
        return state["loop"], saved["best"], means

    @torch.no_grad()
    def _load_trainable(self, weights: dict[str, Tensor]) -> None:
        missing = sorted(set(self.trainable) - set(weights))
        if missing:
            raise KeyError(f"Saved weights lack {missing[:3]}")
        for name, p in self.trainable.items():
            p.copy_(weights[name].to(p.device, p.dtype))

    # -- export -----------------------------------------------------------------------
    def trained_hf_model(self) -> nn.Module:
        """An ordinary HF model with the trained weights (LoRA merged), before the pruning plan."""
        from icp_lens.pruning.source import clean_hf_model

        if self.lora is not None:
            from icp_lens.training.lora import merge_lora

            return merge_lora(self.base, self.lora)
        sync_fused_qkv(self._fused)  # GPT-NeoX: the bridge trained split copies of the fused qkv weight
        return clean_hf_model(self.model)

    def export(
        self,
        out: str | Path,
        *,
        overwrite: bool = False,
        verify: bool = True,
        tolerance: float = 1e-4,
        n_prompts: int = 64,
        result: TrainResult | None = None,
    ) -> Any:
        """Write the trained model (LoRA merged, pruning plan baked in) as an HF checkpoint; verify it.

        Returns the pruner's ``VerificationReport`` or the output path when
        ``verify=False``. The checkpoint is reloaded with ``transformers`` alone and
        compared with the trained HF model ablated per the plan by module hooks (the weight
        edit) and with the trained bridge under the plan's hook edits (what was trained,
        ``hooked_max_abs_logit_diff``). ``training.json`` and ``history.csv`` are written
        next to the weights.
        """
        import json

        from icp_lens.pruning import apply_plan_to_model, export_checkpoint, fingerprint
        from icp_lens.pruning.export import check_target
        from icp_lens.pruning.verify import verification_batches, verify_export

        out = check_target(out, overwrite=overwrite)
        trained = self.trained_hf_model()
        plan = self.plan
        edited = trained
        if plan is not None:
            edited, _ = apply_plan_to_model(copy.deepcopy(trained), plan, check=False)
        out = export_checkpoint(edited, out, tokenizer=self.tokenizer, plan=plan, overwrite=overwrite)
        record = {**self._identity(), "result": None if result is None else _jsonable(result.to_dict())}
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        self.history.to_csv(out / "history.csv", index=False)
        if not verify:
            return out
        prompts = [ex.prompt for ex in self.train_data.examples[:n_prompts]]
        reference_plan = plan or PrunePlan(features=(), mode="zero", fingerprint=fingerprint(trained))
        batches = verification_batches(self.model, prompts=prompts)
        self.model.eval()
        return verify_export(trained, reference_plan, out, hooked=self.model, batches=batches, tolerance=tolerance)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def train(
    model: Any,
    train: str | Path | Sequence[ProbeExample],
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    features: Sequence[Feature | str] = (),
    prune: Sequence[Feature | str] | PrunePlan = (),
    val: str | Path | Sequence[ProbeExample] | None = None,
    pairs: str | Path | Sequence[ProbeExample] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> tuple[Trainer, TrainResult]:
    """Build a :class:`Trainer`, fit it, and export to ``out`` when given; returns both."""
    trainer = Trainer(
        model, train, config, features=features, prune=prune, val=val, pairs=pairs, checkpoint_dir=checkpoint_dir
    )
    result = trainer.fit(resume=resume)
    if out is not None:
        trainer.export(out, overwrite=overwrite, result=result)
    return trainer, result

"""The training loop: ``Trainer.fit`` and one optimisation step, ``Trainer.train_step``.

Each step takes batch ``i`` of epoch ``e`` (shuffled from ``(seed, e)``, so the order is
the same whether or not the run was interrupted), draws a pair batch from the pair pool
when the objective needs one, and runs :meth:`LoopMixin.train_step`: the objective's
terms (:class:`~icp_lens.training.objectives.BatchLoss`, with the pruning plan's edits
active) under an RNG seeded by ``(seed, step)`` (feature and intervention sampling,
dropout), backward, gradient clipping, AdamW (weight decay on matrices only) and a
linear-warm-up + cosine schedule (``transformers.get_cosine_schedule_with_warmup``, the
only piece borrowed from the HF ``Trainer``).

Around the steps, ``fit`` keeps a *loop state* (a JSON-ready dict: step, running means
of the logged terms, early-stopping state, JTT error set, regularised features) and, at
their intervals, logs averaged terms (``log_every``), evaluates and tracks the best
model (:mod:`~icp_lens.training.selection`), re-scores features
(:mod:`~icp_lens.training.rescoring`) and writes checkpoints
(:mod:`~icp_lens.training.resume`). ``fit(resume=True)`` restores the loop state from a
checkpoint instead of starting fresh.

*Mixed-shape pair batches* (``TrainConfig.pair_batch_size``): a pair batch is a list of
equal-shape sub-batches. The first runs with the training batch through the objective
(:class:`~icp_lens.training.objectives.BatchLoss`), the others through a second
``BatchLoss`` that keeps the pair terms only; each sub-batch's pair terms are weighted
by its share of the batch, so the loss is the task term plus the pair terms' mean over
the whole batch, and the logged pair terms are those means. Each piece is
back-propagated as soon as it is computed (gradients add up), so memory holds one
piece's graph at a time.

*Retain term* (``TrainConfig.retain_weight``): after the objective's pieces, a batch of
the retain pool (the stream of ``(seed + 2, epoch)``, so resuming replays it) runs through
the original model (LoRA: the same model with its adapters disabled; full fine-tuning:
the kept original weights) without gradients and through the trained model (with the
pruning plan, as trained); ``retain_weight * retain_kl`` is back-propagated and the KL is
logged as ``retain``.

*Many processes* (under ``torchrun``; :mod:`~icp_lens.training.ddp`): every rank draws the
same batches, ``train_step`` runs the terms on this rank's rows with each term's weight
scaled by the rank's share, sums the gradients across ranks and steps identically
everywhere, so N processes reproduce one process's run. Every rank evaluates the whole
validation set (redundant, but every rank then takes the same early-stopping and
best-model decisions without a message); rank 0 alone writes checkpoints, shows the
progress bar and warns. Outside a process group nothing of this runs.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from icp_lens.distributed import Ranks, barrier, current, is_main
from icp_lens.features import Feature
from icp_lens.training import checkpoint as ckpt
from icp_lens.training.data import TrainBatch
from icp_lens.training.result import TrainResult

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.training.trainer import Trainer

__all__ = ["LoopMixin", "model_device"]


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter."""
    return next(model.parameters()).device


class LoopMixin:
    """``Trainer``'s loop: ``fit``, ``train_step`` and their helpers."""

    def _optimizer(self: Trainer, total: int) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW (weight decay on parameters of 2+ dimensions only) and its warm-up + cosine schedule."""
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

    def _step_seed(self: Trainer, step: int) -> int:
        return (self.config.seed * 1_000_003 + step * 7_919 + 12_345) % (2**63)

    def train_step(
        self: Trainer,
        step: int,
        batch: TrainBatch,
        pair_batch: TrainBatch | list[TrainBatch] | None,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One optimisation step on ``batch``: terms, backward, clipping, AdamW, schedule.

        ``step`` seeds the step's sampling (features, interventions, dropout) and picks the
        retain batch. ``pair_batch`` is a batch of the pair pool, a list of equal-shape
        sub-batches (a mixed-shape pair batch) or ``None``. Returns the loss terms (``loss``
        with its graph when it was one piece, the others detached; ``retain`` with the
        retain term) and the gradient norm before clipping.
        """
        cfg = self.config
        parts = pair_batch if isinstance(pair_batch, list) else [pair_batch]
        optimizer.zero_grad(set_to_none=True)
        ranks = current()
        if ranks is not None:
            return self._distributed_step(step, batch, parts, optimizer, scheduler, ranks)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(self._step_seed(step))
            gen = torch.Generator().manual_seed(self._step_seed(step))
            with self.pruned():
                if len(parts) == 1:
                    terms = self.loss(batch, gen, parts[0])
                    terms["loss"].backward()
                else:
                    terms = self._mixed_pair_step(batch, parts, gen)
            if self.retain_data is not None:
                kl = self._retain_term(step)
                (cfg.retain_weight * kl).backward()
                terms["retain"] = kl.detach()
                terms["loss"] = terms["loss"].detach() + cfg.retain_weight * terms["retain"]
        self._check_gradients(step)
        params = list(self.trainable.values())
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        optimizer.step()
        scheduler.step()
        return terms, norm

    def _distributed_step(
        self: Trainer, step: int, batch: TrainBatch, parts: list, optimizer: torch.optim.Optimizer, scheduler: Any,
        ranks: Ranks,
    ) -> tuple[dict[str, Tensor], Tensor]:  # fmt: skip
        """:meth:`train_step` on this rank's rows, gradients summed across ranks (:mod:`~icp_lens.training.ddp`)."""
        from icp_lens.training import ddp

        cfg = self.config
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(self._step_seed(step))
            gen = torch.Generator().manual_seed(self._step_seed(step))
            with self.pruned():
                local = ddp.distributed_step_terms(self, batch, parts, gen, ranks)
            if self.retain_data is not None:
                tokens = self._retain_batch(step)
                mine = tokens[ranks.rank :: ranks.world_size]
                if len(mine):
                    share = len(mine) / len(tokens)
                    kl = self._retain_term(step, tokens=mine.contiguous())
                    (cfg.retain_weight * share * kl).backward()
                    local["retain"] = share * float(kl.detach())
                    local["loss"] = local.get("loss", 0.0) + cfg.retain_weight * local["retain"]
        params = list(self.trainable.values())
        ddp.sum_gradients(params)
        terms = ddp.reduce_terms(local)
        self._check_gradients(step)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        optimizer.step()
        scheduler.step()
        return terms, norm

    def fit(
        self: Trainer, *, resume: bool = False, callback: Callable[[Trainer, int], None] | None = None
    ) -> TrainResult:
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
        if current() is not None:
            self._join_ranks()
        s: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "stopped_early": False,
                             "running": {}, "n_running": 0, "jtt_errors": None,
                             "features": [str(f) for f in self.features]}  # fmt: skip
        best_weights: dict[str, Tensor] | None = None
        if resume and not ckpt.has_checkpoint(self.checkpoint_dir):
            warnings.warn(f"resume: no checkpoint in {self.checkpoint_dir}; training from the start", stacklevel=2)
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

            errors = torch.zeros(len(data), dtype=torch.bool, device="cpu")  # with the data, on the CPU
            errors[s["jtt_errors"]] = True
            data = data.with_weights(jtt_weights(errors, cfg.jtt_upweight))
        bar = tqdm(total=total, initial=s["step"], disable=not (cfg.progress and is_main()),
                   desc=f"train ({cfg.objective})")  # fmt: skip
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
                batch = epoch_batches[1][i].to(model_device(self.model))
                pair_batch = self._pair_batch(step) if self._pairs_always or batch.spurious is None else None
                tic = time.perf_counter()
                terms, norm = self.train_step(step, batch, pair_batch, opt, sched)
                s["step"] = step = step + 1
                self._accumulate(s, terms, norm, tic)
                if step % cfg.log_every == 0 or step == total:
                    self._log_train(s, step, per_epoch, sched, bar)
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

    def _join_ranks(self: Trainer) -> None:
        """Under a process group: start from rank 0's weights; warn (rank 0, once) where N != 1 process."""
        from icp_lens.training import ddp

        ddp.broadcast_parameters(list(self.trainable.values()))
        reasons = ddp.reproducibility_warnings(self)
        if reasons and is_main() and not getattr(self, "_warned_ranks", False):
            warnings.warn(
                f"{current().world_size} processes will not reproduce one process's run: " + "; ".join(reasons)
                + ". Each rank trains on its rows and the gradients are summed, which is still a valid run.",
                stacklevel=3,
            )  # fmt: skip
        self._warned_ranks = True
        barrier()

    @staticmethod
    def _accumulate(s: dict[str, Any], terms: dict[str, Tensor], norm: Tensor, tic: float) -> None:
        """Add one step's terms, gradient norm and seconds (since ``tic``) to the running sums."""
        run = s["running"]
        for name, value in terms.items():
            run[name] = run.get(name, 0.0) + float(value.detach())
        run["grad_norm"] = run.get("grad_norm", 0.0) + float(norm)
        run["seconds"] = run.get("seconds", 0.0) + time.perf_counter() - tic
        s["n_running"] += 1

    def _log_train(self: Trainer, s: dict[str, Any], step: int, per_epoch: int, sched: Any, bar: Any) -> None:
        """A ``kind="train"`` history row: the running means (``seconds``: their sum); resets them."""
        row = {k: v / s["n_running"] for k, v in s["running"].items()}
        row["seconds"] = s["running"]["seconds"]
        self._history.append({"step": step, "epoch": step / per_epoch, "kind": "train",
                              "lr": sched.get_last_lr()[0], **row})  # fmt: skip
        s["running"], s["n_running"] = {}, 0
        bar.set_postfix(loss=f"{row['loss']:.4f}")

    def _pair_batch(self: Trainer, step: int) -> TrainBatch | list[TrainBatch] | None:
        """Batch ``step`` of the pair pool's endless, seeded stream (``None`` without a pool).

        With ``pair_batch_size`` set: a mixed-shape batch (a list of equal-shape sub-batches).
        """
        if self.pair_data is None:
            return None
        bs, mixed = self.config.pair_batch_size or self.config.batch_size, self.config.pair_batch_size is not None
        per_epoch = self.pair_data.n_mixed_batches(bs) if mixed else self.pair_data.n_batches(bs)
        epoch, i = divmod(step, per_epoch)
        if getattr(self, "_pair_epoch", (None,))[0] != (epoch, bs, mixed):
            make = self.pair_data.mixed_epoch if mixed else self.pair_data.epoch
            self._pair_epoch = ((epoch, bs, mixed), make(epoch, bs, seed=self.config.seed + 1))
        device = model_device(self.model)
        chosen = self._pair_epoch[1][i]
        return [b.to(device) for b in chosen] if mixed else chosen.to(device)

    def _mixed_pair_step(
        self: Trainer, batch: TrainBatch, parts: list[TrainBatch], gen: torch.Generator
    ) -> dict[str, Tensor]:
        """Terms of a step whose pair batch has several shapes; back-propagates each piece.

        Part ``k`` (``n_k`` of the ``n`` pairs) adds ``(n_k / n) * pair terms``; the first
        runs with the task term (through ``self.loss`` with its pair weights scaled), the
        others through a pair-only ``BatchLoss``. Logged pair terms: their weighted means.
        """
        from icp_lens.training.objectives import BatchLoss

        total = sum(p.size for p in parts)
        if getattr(self, "_pair_loss", None) is None:
            self._pair_loss = BatchLoss(self.model, self.config, features=self.loss.features)
        pair_loss = self._pair_loss
        pair_loss.features, pair_loss.means = self.loss.features, self.loss.means
        main_weights = dict(self.loss.weights)
        pair_weights = {k: v for k, v in main_weights.items() if k != "task"}
        terms: dict[str, Tensor] = {}
        sums: dict[str, Tensor] = {}
        loss_value = torch.zeros((), device="cpu")  # each part's loss is added from the CPU
        try:
            for k, part in enumerate(parts):
                share = part.size / total
                if k == 0:
                    self.loss.weights = {n: (v if n == "task" else v * share) for n, v in main_weights.items()}
                    out = self.loss(batch, gen, part)
                    terms["task"] = out["task"]
                else:
                    pair_loss.weights = {n: v * share for n, v in pair_weights.items()}
                    out = pair_loss(part, gen)
                out["loss"].backward()
                loss_value = loss_value + out["loss"].detach().cpu()
                for name, value in out.items():
                    if name not in ("loss", "task"):
                        sums[name] = sums.get(name, 0.0) + share * value.detach()
        finally:
            self.loss.weights = main_weights
        terms.update(sums)
        terms["loss"] = loss_value
        return terms

    def _retain_batch(self: Trainer, step: int) -> Tensor:
        """Batch ``step`` of the retain pool's endless, seeded stream (token ids)."""
        assert self.retain_data is not None
        bs = self.config.retain_batch_size
        epoch, i = divmod(step, self.retain_data.n_batches(bs))
        if getattr(self, "_retain_epoch", (None,))[0] != epoch:
            self._retain_epoch = (epoch, self.retain_data.epoch(epoch, bs, seed=self.config.seed + 2))
        return self._retain_epoch[1][i].to(model_device(self.model))

    def _reference_logits(self: Trainer, tokens: Tensor) -> Tensor:
        """The original model's logits on ``tokens`` (no gradient, no pruning plan)."""
        with torch.no_grad():
            if self.lora is not None:
                with self.lora.peft_model.disable_adapter():
                    return self.model(tokens).detach()
            if self._reference is None:
                device = model_device(self.model)
                same = model_device(self.base) == device
                self._reference = self.base if same else copy.deepcopy(self.base).to(device).requires_grad_(False)
            out = self._reference(tokens)
            return (out.logits if hasattr(out, "logits") else out).detach()

    def _retain_term(self: Trainer, step: int, tokens: Tensor | None = None) -> Tensor:
        """``KL(p_orig || p_theta)`` on retain batch ``step`` or ``tokens`` (with the graph of the trained side)."""
        from icp_lens.training.losses import retain_kl

        tokens = self._retain_batch(step) if tokens is None else tokens
        reference = self._reference_logits(tokens)
        with self.pruned():
            logits = self.model(tokens)
        return retain_kl(reference, logits)

    def _check_gradients(self: Trainer, step: int) -> None:
        """After the first step of a LoRA run: every adapter must have received a gradient."""
        if step != 0 or self.lora is None:
            return
        from icp_lens.training.lora import dead_adapters

        dead = dead_adapters(self.lora)
        if dead:
            raise RuntimeError(
                f"LoRA layers {dead[:4]} received no gradient: the bridge does not run these modules. "
                "Exclude them from lora_targets."
            )

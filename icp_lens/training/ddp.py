"""Data-parallel training: every batch split by rows across ``torch.distributed`` ranks.

Under ``torchrun --nproc-per-node N`` (:mod:`icp_lens.distributed`), every rank draws the
same global batch (the data order is seeded by ``(seed, epoch)``), keeps its rows
``rank, rank + N, ...`` of the training batch, of the pair batch (each sub-batch of a
mixed-shape pair batch) and of the retain batch, and runs the objective on them. Each
loss term's weight is scaled by this rank's *share* of what the term averages over:

* ``task`` (and ``cda``): ``sum(w * ce) / sum(w)`` over the examples, so the share is this
  rank's part of the example weights ``batch.weight`` (1 each unless JTT changed them);
* the pair terms (invariance, consistency, clp): plain means over the anchor rows, so the
  share is this rank's part of the rows (of the whole pair batch, for a mixed one);
* ``retain``: a mean over rows of equal length, so again the share of the rows.

The share-weighted per-rank losses then *sum* to the one-process loss, and so do their
gradients: after backward, :func:`sum_gradients` adds the trainable parameters'
gradients across ranks (one flat buffer, one ``all_reduce``), and clipping, AdamW and the
schedule run identically on every rank. That is what ``DistributedDataParallel``'s reducer
does (with mean-of-means gradients); it is done by hand here because the bridge's forward
passes are entered through hook contexts and stacked blocks
(:mod:`icp_lens.training.forward`), not through one wrapper module's ``forward`` that DDP
could intercept. A rank whose slice of a batch is empty runs no forward on it and adds
zeros; a parameter that no rank gave a gradient keeps ``grad=None`` (AdamW skips it, as
in one process). :func:`broadcast_parameters` starts every rank from rank 0's weights.

So N processes reproduce one process's run (same data order, same loss curve and weights
to float32 round-off) for ``erm``, ``jtt``, ``consistency``, ``cda``, ``clp`` and
``invariance`` with the ``resample``, ``mean`` and ``zero`` interventions (the feature and
intervention draws come from a generator seeded per step and do not depend on the batch
size; ``resample``'s first patched position is taken over the global batch). What cannot
be split row by row, :func:`reproducibility_warnings` names and ``fit`` warns about once:
``groupdro`` (group weights from the batch's group means), ``contrastive`` (InfoNCE
negatives are the other rows), the ``resample_batch`` intervention (the value of another
row), ``pair_fraction < 1`` (the head of each rank's slice is not a slice of the global
head) and active dropout (masks drawn for the global batch).

Around the steps (:mod:`icp_lens.training.loop`): every rank evaluates the whole
validation set and fits the same means and JTT error set (redundant, but the
early-stopping and best-model decisions are then the same everywhere without a
message); rank 0 writes the checkpoints and the export while the others wait at a
barrier, and ``fit(resume=True)`` resumes every rank from the same checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from icp_lens.distributed import Ranks, all_reduce_sum
from icp_lens.training.data import TrainBatch

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.training.objectives import BatchLoss
    from icp_lens.training.trainer import Trainer

__all__ = [
    "broadcast_parameters",
    "distributed_step_terms",
    "local_rows",
    "reduce_terms",
    "reproducibility_warnings",
    "sum_gradients",
    "sync_generator",
]

#: the logged names, in the order one process logs them
_ORDER = ("task", "invariance", "consistency", "cda", "clp", "contrastive", "loss", "retain")


def local_rows(batch: TrainBatch, ranks: Ranks) -> TrainBatch | None:
    """This rank's rows ``rank, rank + N, ...`` of ``batch`` (``None`` when there are none)."""
    if ranks.rank >= batch.size:
        return None
    step = ranks.world_size
    return TrainBatch(**{k: (v[ranks.rank :: step].contiguous() if isinstance(v, Tensor) else v)
                         for k, v in batch.__dict__.items()})  # fmt: skip


def _weight_share(part: TrainBatch | None, whole: TrainBatch) -> float:
    """``part``'s share of ``whole``'s example weights (what a weighted mean averages over)."""
    if part is None:
        return 0.0
    return float(part.weight.double().sum() / whole.weight.double().sum())


@torch.no_grad()
def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's values of ``params`` (zeros elsewhere, then one summed buffer)."""
    from icp_lens.distributed import current

    ranks = current()
    if ranks is None or not params:
        return
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    if not ranks.main:
        flat.zero_()
    flat = all_reduce_sum(flat)
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()


def sync_generator(gen: torch.Generator) -> None:
    """Give every rank rank 0's state of ``gen`` (after a rank skipped a piece that draws from it)."""
    from icp_lens.distributed import current

    ranks = current()
    if ranks is None:
        return
    state = gen.get_state().to(torch.int64)
    if not ranks.main:
        state.zero_()
    gen.set_state(all_reduce_sum(state).to(torch.uint8))


@torch.no_grad()
def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over the ranks (one flat ``all_reduce``).

    A rank that gave a parameter no gradient adds zeros; a parameter no rank gave one
    keeps ``grad=None``, as it would in one process.
    """
    if not params:
        return
    pieces = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if p.grad is None
              else p.grad.detach().reshape(-1).float() for p in params]  # fmt: skip
    seen = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=pieces[0].device)
    total = all_reduce_sum(torch.cat([*pieces, seen]))
    flags = total[-len(params) :].tolist()
    offset = 0
    for p, flag in zip(params, flags, strict=True):
        n = p.numel()
        p.grad = total[offset : offset + n].view_as(p).to(p.dtype).clone() if flag > 0 else None
        offset += n


def reduce_terms(local: dict[str, float]) -> dict[str, Tensor]:
    """The global terms: each rank's share-weighted values summed (a name any rank logged is kept)."""
    names = list(_ORDER)
    unknown = sorted(set(local) - set(_ORDER))
    if unknown:
        raise ValueError(f"terms {unknown} have no place in the all-reduce; known: {list(_ORDER)}")
    # on the CPU: all_reduce_sum moves it to the backend's device and back
    values = torch.tensor([local.get(n, 0.0) for n in names] + [1.0 if n in local else 0.0 for n in names],
                          dtype=torch.float64, device="cpu")  # fmt: skip
    total = all_reduce_sum(values)
    k = len(names)
    return {n: total[i].float() for i, n in enumerate(names) if total[k + i] > 0}


def _scaled(weights: dict[str, float], task: float, rows: float, cda: float, keep: tuple[str, ...]) -> dict[str, float]:
    """``weights`` restricted to ``keep``, each times its share (task / cda: weights, others: rows)."""
    share = {"task": task, "cda": cda}
    return {n: w * share.get(n, rows) for n, w in weights.items() if n in keep}


def distributed_step_terms(
    trainer: Trainer, batch: TrainBatch, parts: list[TrainBatch | None], gen: torch.Generator, ranks: Ranks
) -> dict[str, float]:
    """This rank's share-weighted terms of one step; back-propagates each piece it runs.

    ``parts`` is ``[None]`` (the pair terms on the training batch itself), ``[pair batch]``
    or the sub-batches of a mixed-shape pair batch. Returns, per logged name, this rank's
    contribution to the global value (``share * term``; ``loss`` its weighted sum): summed
    over the ranks by :func:`reduce_terms`, they are what one process logs.
    """
    from icp_lens.training.counterfactuals import shared_prefix
    from icp_lens.training.objectives import BatchLoss

    loss = trainer.loss
    weights = dict(loss.weights)
    pair_names = tuple(n for n in weights if n != "task")
    mine = local_rows(batch, ranks)
    task_share = _weight_share(mine, batch)
    total_pairs = sum(p.size for p in parts if p is not None)
    out: dict[str, float] = {}

    def pair_loss() -> BatchLoss:
        if getattr(trainer, "_pair_loss", None) is None:
            trainer._pair_loss = BatchLoss(trainer.model, trainer.config, features=loss.features)
        trainer._pair_loss.features, trainer._pair_loss.means = loss.features, loss.means
        return trainer._pair_loss

    def run(fn: BatchLoss, scaled: dict[str, float], x: TrainBatch, pairs: TrainBatch | None, start: int | None,
            shares: dict[str, float]) -> None:  # fmt: skip
        fn.weights, fn.shared_start = scaled, start
        try:
            terms = fn(x, gen, pairs)
        finally:
            fn.weights, fn.shared_start = weights, None
        terms["loss"].backward()
        out["loss"] = out.get("loss", 0.0) + float(terms["loss"].detach())
        for name, value in terms.items():
            if name != "loss" and name in shares:
                out[name] = out.get(name, 0.0) + shares[name] * float(value)

    def start_of(anchor: TrainBatch) -> int | None:
        """The first position where the global anchor's counterfactuals differ from its prompts."""
        if anchor.spurious is None or anchor.spurious.shape[1] != anchor.tokens.shape[1]:
            return None
        return shared_prefix(anchor.tokens, anchor.spurious)

    for k, part in enumerate(parts):
        if part is None:  # the pair terms on the training batch's own rows
            if mine is not None:
                rows = mine.size / batch.size
                shares = {n: (task_share if n in ("task", "cda") else rows) for n in (*weights, "task")}
                run(loss, _scaled(weights, task_share, rows, task_share, tuple(weights)), mine, None,
                    start_of(batch), shares)  # fmt: skip
            continue
        piece = local_rows(part, ranks)
        rows = 0.0 if piece is None else piece.size / total_pairs
        cda = (part.size / total_pairs) * _weight_share(piece, part)
        pair_shares = {n: (cda if n == "cda" else rows) for n in pair_names}
        with_task = k == 0 and mine is not None
        if with_task and piece is not None:
            run(loss, _scaled(weights, task_share, rows, cda, tuple(weights)), mine, piece, start_of(part),
                {"task": task_share, **pair_shares})  # fmt: skip
        elif with_task:
            run(loss, _scaled(weights, task_share, rows, cda, ("task",)), mine, None, None, {"task": task_share})
        elif piece is not None and pair_names:
            run(pair_loss(), _scaled(weights, 0.0, rows, cda, pair_names), piece, None, start_of(part), pair_shares)
        if len(parts) > 1 and part.size < ranks.world_size:  # a rank skipped this piece: align the draws
            sync_generator(gen)
    return out


def reproducibility_warnings(trainer: Trainer) -> list[str]:
    """Why N processes would not reproduce one process's run of ``trainer`` (empty: they will)."""
    cfg = trainer.config
    weights = trainer.loss.weights
    reasons = []
    if cfg.objective == "groupdro":
        reasons.append("groupdro weighs each group by its mean loss over the batch, and each rank updates the group "
                       "weights from its own slice")  # fmt: skip
    if "contrastive" in weights:
        reasons.append("the contrastive term's InfoNCE negatives are the other rows of the batch, and each rank "
                       "sees its slice only")  # fmt: skip
    if "invariance" in weights and "resample_batch" in cfg.interventions:
        reasons.append("the resample_batch intervention takes each feature's value on another row of the batch "
                       "(each rank's slice has other rows)")  # fmt: skip
    if cfg.pair_fraction < 1.0:
        reasons.append("pair_fraction < 1 computes the pair terms on the head of each rank's slice, not on a slice "
                       "of the global head")  # fmt: skip
    dropout = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if dropout or (cfg.lora and cfg.lora_dropout > 0):
        reasons.append("dropout is active (its masks are drawn per rank for the slice, not for the global batch); "
                       "set dropout=0 (--dropout 0) and lora_dropout=0 to reproduce")  # fmt: skip
    return reasons

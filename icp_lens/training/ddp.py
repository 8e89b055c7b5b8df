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

Two terms read other ranks' rows, and :class:`StepSync` tells the loss where this rank's
rows sit in the global batch:

* ``groupdro``'s group weights are updated from the global batch's group means: each
  rank all-reduces its per-group loss sums (divided by the global batch's counts, which
  every rank knows), updates ``q`` as one process would, identically everywhere, and
  back-propagates its own part ``sum_g q_g (its group-g sum) / count_g``;
* the ``contrastive`` term's InfoNCE negatives are all the batch's rows: the positives are
  gathered from every rank (:func:`~icp_lens.distributed.gather_rows_with_grad`, whose
  backward sums the gathered gradient across ranks and returns each rank its rows), and
  each rank scores its anchors against all of them.

A rank with no rows of such a piece runs one stand-in row whose terms weigh 0, so every
rank makes the same collective calls in the same order. Two more settings read the
global batch, which every rank holds: ``pair_fraction < 1`` anchors the pair terms on the
head of the global batch (each rank on its rows of that head, a head of its own rows),
and the ``resample_batch`` intervention rolls the global batch's rows to find each row's
source (the tokens of another rank's row, run through the model here).

So N processes reproduce one process's run (same data order, same loss curve and weights
to float32 round-off) for ``erm``, ``jtt``, ``groupdro``, ``consistency``, ``cda``, ``clp``,
``contrastive`` and ``invariance`` with every intervention, at any ``pair_fraction`` (the
feature and intervention draws come from a generator seeded per step and do not depend on
the batch size; ``resample``'s first patched position is taken over the global batch).
What does not, :func:`reproducibility_warnings` names and ``fit`` warns about once: active
dropout (masks drawn per rank for its slice, not for the global batch).

Around the steps (:mod:`icp_lens.training.loop`): every rank evaluates the whole
validation set and fits the same means and JTT error set (redundant, but the
early-stopping and best-model decisions are then the same everywhere without a
message); rank 0 writes the checkpoints and the export while the others wait at a
barrier, and ``fit(resume=True)`` resumes every rank from the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from icp_lens.distributed import Ranks, all_reduce_sum, gather_rows_with_grad
from icp_lens.training.data import TrainBatch

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.training.objectives import BatchLoss
    from icp_lens.training.trainer import Trainer

__all__ = [
    "StepSync",
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


@dataclass(frozen=True)
class StepSync:
    """Where one rank's rows sit in one piece of a global step, for the terms that read other ranks' rows.

    ``anchor`` is the global batch whose rows the pair terms anchor on (its head, under
    ``pair_fraction < 1``); this rank holds its rows ``rank, rank + N, ...``.
    ``group_counts`` are the global training batch's examples per group (GroupDRO;
    ``None`` otherwise); ``gathers`` says whether InfoNCE gathers its positives from every
    rank. ``task_idle`` / ``anchor_idle``: this rank holds no rows of the training / anchor
    batch and runs a stand-in row whose terms weigh 0.
    """

    ranks: Ranks
    anchor: TrainBatch
    group_counts: Tensor | None = None
    gathers: bool = False
    task_idle: bool = False
    anchor_idle: bool = False

    @property
    def anchor_rows(self) -> int:
        """Rows of the global anchor batch."""
        return self.anchor.size

    @property
    def positions(self) -> list[int]:
        """This rank's anchor rows' places in the global anchor batch."""
        return [] if self.anchor_idle else list(range(self.ranks.rank, self.anchor_rows, self.ranks.world_size))

    @property
    def local_head(self) -> int:
        """How many of this rank's rows (a head of them) the pair terms anchor on; 1 for a stand-in."""
        return max(1, len(self.positions))

    def shifted_tokens(self, shift: int) -> Tensor:
        """This rank's rows of the global anchor's tokens rolled by ``shift`` rows (``resample_batch``'s source)."""
        rolled = self.anchor.tokens.roll(shift % self.anchor_rows, dims=0)
        return rolled[self.positions] if self.positions else rolled[:1]

    def info_nce(
        self, z: Float[Tensor, "rows d"], z_positive: Float[Tensor, "rows d"], *, temperature: float
    ) -> Tensor:
        """This rank's anchors' InfoNCE against the positives of every rank (its mean over its rows).

        A stand-in rank still gathers, and returns 0 times the gathered sum: its backward
        then joins the other ranks' (the gradient's ``all_reduce``).
        """
        from icp_lens.training import losses as L

        mine = self.positions
        everything = gather_rows_with_grad(z_positive.float()[: len(mine)], mine, self.anchor_rows)
        if not mine:
            return 0.0 * everything.sum()
        targets = torch.as_tensor(mine, dtype=torch.long, device=z.device)
        return L.info_nce(z, everything, temperature=temperature, targets=targets)


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


def _group_counts(batch: TrainBatch, n_groups: int) -> Tensor:
    """Examples per group in the global batch (ids ``-1``, no group, left out)."""
    from icp_lens.training.losses import group_sums

    ids = batch.group_id.long().cpu()
    return group_sums(torch.zeros(ids.shape), ids, n_groups)[1]


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
    cfg = trainer.config
    weights = dict(loss.weights)
    pair_names = tuple(n for n in weights if n != "task")
    groupdro = cfg.objective == "groupdro" and loss.group_q is not None
    gathers = "contrastive" in weights
    synced = groupdro or gathers  # terms that read other ranks' rows: every rank runs every piece
    counts = _group_counts(batch, loss.n_groups) if groupdro else None
    mine = local_rows(batch, ranks)
    # GroupDRO's task term is already this rank's part of the global one (StepSync), not a mean to weigh
    task_share = 1.0 if groupdro else _weight_share(mine, batch)
    total_pairs = sum(p.size for p in parts if p is not None)
    out: dict[str, float] = {}

    def pair_loss() -> BatchLoss:
        if getattr(trainer, "_pair_loss", None) is None:
            trainer._pair_loss = BatchLoss(trainer.model, trainer.config, features=loss.features)
        trainer._pair_loss.features, trainer._pair_loss.means = loss.features, loss.means
        return trainer._pair_loss

    def run(fn: BatchLoss, scaled: dict[str, float], x: TrainBatch, pairs: TrainBatch | None, sync: StepSync,
            shares: dict[str, float]) -> None:  # fmt: skip
        fn.weights, fn.shared_start, fn.sync = scaled, start_of(sync.anchor), sync
        try:
            terms = fn(x, gen, pairs)
        finally:
            fn.weights, fn.shared_start, fn.sync = weights, None, None
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

    def anchored(whole: TrainBatch, rows: TrainBatch | None) -> tuple[TrainBatch, TrainBatch | None]:
        """The global rows the pair terms read (the head under pair_fraction) and this rank's of them."""
        head = whole if cfg.pair_fraction >= 1.0 else whole.head(max(1, round(cfg.pair_fraction * whole.size)))
        n = len(range(ranks.rank, head.size, ranks.world_size)) if rows is not None else 0
        return head, (rows.head(n) if n else None)

    for k, part in enumerate(parts):
        if part is None:  # the pair terms on the training batch's own rows
            if mine is None and not synced:
                continue
            head, own = anchored(batch, mine)
            rows = 0.0 if own is None else own.size / head.size
            cda = _weight_share(own, head)
            shares = {n: (task_share if n == "task" else cda if n == "cda" else rows) for n in (*weights, "task")}
            sync = StepSync(ranks, head, counts, gathers, task_idle=mine is None, anchor_idle=own is None)
            keep = tuple(weights) if own is not None or synced else ("task",)
            run(loss, _scaled(weights, task_share, rows, cda, keep), batch.head(1) if mine is None else mine, None,
                sync, shares)  # fmt: skip
            continue
        piece = local_rows(part, ranks)
        head, own = anchored(part, piece)
        piece = piece if own is not None else None  # a rank with rows of the part but none of its head has none
        rows = 0.0 if own is None else (part.size / total_pairs) * (own.size / head.size)
        cda = (part.size / total_pairs) * _weight_share(own, head)
        pair_shares = {n: (cda if n == "cda" else rows) for n in pair_names}
        if synced and (k == 0 or pair_names):  # every rank runs the piece, a stand-in row where it has none
            stand_in = part.head(1) if piece is None else piece
            if k == 0:
                sync = StepSync(ranks, head, counts, gathers, task_idle=mine is None, anchor_idle=own is None)
                run(loss, _scaled(weights, task_share, rows, cda, tuple(weights)), batch.head(1) if mine is None
                    else mine, stand_in, sync, {"task": task_share, **pair_shares})  # fmt: skip
            else:
                sync = StepSync(ranks, head, None, gathers, task_idle=True, anchor_idle=own is None)
                run(pair_loss(), _scaled(weights, 0.0, rows, cda, pair_names), stand_in, None, sync, pair_shares)
        else:
            with_task = k == 0 and mine is not None
            sync = StepSync(ranks, head, anchor_idle=own is None)
            if with_task and piece is not None:
                run(loss, _scaled(weights, task_share, rows, cda, tuple(weights)), mine, piece, sync,
                    {"task": task_share, **pair_shares})  # fmt: skip
            elif with_task:
                run(loss, _scaled(weights, task_share, rows, cda, ("task",)), mine, None, sync, {"task": task_share})
            elif piece is not None and pair_names:
                run(pair_loss(), _scaled(weights, 0.0, rows, cda, pair_names), piece, None, sync, pair_shares)
        if len(parts) > 1 and head.size < ranks.world_size:  # a rank skipped this piece: align the draws
            sync_generator(gen)
    return out


def reproducibility_warnings(trainer: Trainer) -> list[str]:
    """Why N processes would not reproduce one process's run of ``trainer`` (empty: they will)."""
    cfg = trainer.config
    reasons = []
    dropout = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if dropout or (cfg.lora and cfg.lora_dropout > 0):
        reasons.append("dropout is active (its masks are drawn per rank for the slice, not for the global batch); "
                       "set dropout=0 (--dropout 0) and lora_dropout=0 to reproduce")  # fmt: skip
    return reasons

"""Many processes with ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node N --no-python icp-lens score ...`` starts N copies of the
command, each with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment.
:func:`init_from_env` (called by the CLI before any model is loaded; call it yourself in a
script run by torchrun) joins them into one process group: NCCL when the processes run
on CUDA GPUs (rank ``r`` takes ``cuda:LOCAL_RANK``), gloo on the CPU. Inside a group the
library splits the work by itself:

* **exact scoring** is feature-parallel: rank ``r`` scores the features ``r, r+N, ...``
  (the interleaving of ``score --shard r/N``), each rank resuming from its own checkpoint
  file; the rows are then summed across ranks into every rank's full table;
* **attribution** is data-parallel: rank ``r`` takes the probe batches ``r, r+N, ...``
  and the per-example estimates are summed across ranks;
* **hybrid** ranks by data-parallel attribution, then verifies its top feature-parallel;
* **training** splits every batch by rows and sums the gradients across ranks (what
  DDP's reducer does; see :mod:`icp_lens.training.ddp`).

Each example's (or feature's) numbers are computed by exactly one rank and added to
zeros on the others, so the table equals the one-process table (to the last bit for the
exact rows). Only rank 0 writes files and prints; the others compute.

Outside a process group (a notebook, a plain ``icp-lens`` call) :func:`current` is
``None`` and nothing here does anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor

__all__ = [
    "Ranks",
    "all_reduce_sum",
    "barrier",
    "current",
    "gather_rows",
    "gather_rows_with_grad",
    "init_from_env",
    "is_main",
    "launched_by_torchrun",
    "rank_device",
    "split",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and prints)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment names more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def rank_device(device: torch.device) -> torch.device:
    """The device this rank should use for ``device``: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    import torch

    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"LOCAL_RANK {local} but this node has {count} CUDA GPU(s): start at most "
                             f"{count} processes per node (torchrun --nproc-per-node {count})")  # fmt: skip
        return torch.device("cuda", local)
    return device


def init_from_env(device: torch.device | str = "cpu") -> Ranks | None:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns ``None`` (and does nothing) when fewer than two processes were started. NCCL
    when ``device`` is a CUDA device, gloo otherwise. Calling it twice is harmless.
    """
    import torch
    import torch.distributed as dist

    if not launched_by_torchrun():
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {missing} are not: start the processes with torchrun "
                         "(torchrun --nproc-per-node N --no-python icp-lens ...)")  # fmt: skip
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run one process")
    device = torch.device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(rank_device(device))
        dist.init_process_group(backend=backend)
    return current()


def current() -> Ranks | None:
    """The process group this process belongs to, or ``None`` (none, or a group of one)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 str(dist.get_backend()))  # fmt: skip


def is_main() -> bool:
    """True outside a process group and on rank 0 inside one."""
    ranks = current()
    return ranks is None or ranks.main


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if current() is not None:
        import torch.distributed as dist

        dist.barrier()


def split(items: Sequence[T], ranks: Ranks | None = None) -> list[T]:
    """This rank's share of ``items``: positions ``rank, rank + N, ...`` (all of them outside a group)."""
    ranks = ranks or current()
    return list(items) if ranks is None else list(items[ranks.rank :: ranks.world_size])


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over the ranks (a new tensor on ``tensor``'s device; itself outside a group).

    gloo reduces CPU tensors and NCCL CUDA tensors: the sum runs on the backend's device
    and comes back.
    """
    import torch
    import torch.distributed as dist

    ranks = current()
    if ranks is None:
        return tensor
    where = torch.device("cpu") if ranks.backend == "gloo" else torch.device("cuda", torch.cuda.current_device())
    buffer = tensor.detach().to(where, copy=True).contiguous()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def gather_rows(local: Tensor, mine: Sequence[int], n_rows: int) -> Tensor:
    """The ``[n_rows, ...]`` tensor whose rows ``mine`` come from this rank's ``local``.

    Every row is owned by exactly one rank; the others contribute zeros, so the sum is each
    owner's value bit for bit (``NaN`` included). Outside a group: ``local`` put in place.
    """
    import torch

    full = torch.zeros((n_rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
    if len(mine):
        full[torch.as_tensor(list(mine), dtype=torch.long, device=local.device)] = local
    return all_reduce_sum(full)


def gather_rows_with_grad(local: Tensor, mine: Sequence[int], n_rows: int) -> Tensor:
    """:func:`gather_rows` that gradients flow back through, to the rank that owns each row.

    For a loss that reads every rank's rows (InfoNCE's negatives): each rank computes its
    share of the loss on the gathered tensor, and backward sums the gathered tensor's
    gradient over the ranks (one ``all_reduce``) and hands each rank the rows it owns, so
    the ranks' parameter gradients sum to the one-process gradient. Every rank must call
    it, in the same order, and back-propagate through it (a rank without rows passes an
    empty ``mine``). Outside a group: :func:`gather_rows`.
    """
    import torch

    class _Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rows: Tensor) -> Tensor:  # type: ignore[override]
            ctx.shape = rows.shape
            return gather_rows(rows, mine, n_rows)

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
            total = all_reduce_sum(grad.contiguous())
            out = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
            if len(mine):
                out.copy_(total[torch.as_tensor(list(mine), dtype=torch.long, device=grad.device)])
            return out

    return _Gather.apply(local)

"""Training data: probe-format examples tokenized once, served as shuffled equal-length batches.

Training reads the same JSONL format as scoring and evaluation (``icp_lens.probes``):
``prompt``, ``answer``, ``alternatives`` and, where an objective needs them, a
``spurious_counterfactual`` and a ``group``. Examples are tokenized by
:class:`~icp_lens.probeset.ProbeSet` (the model's own BOS rule, single-token answers,
no padding ever), then split into *shards* of one shape (prompt length, counterfactual
length). An epoch shuffles within each shard, cuts it into batches and shuffles the
batch order, from a generator seeded by ``(seed, epoch)``: the order of epoch ``e`` is
the same whether or not training was interrupted before it, which is what makes resuming
exact.

*Mixed-shape batches.* :meth:`TrainData.mixed_epoch` serves batches of exactly
``batch_size`` examples drawn across shapes (one global shuffle, cut into chunks), each
as a list of equal-shape sub-batches: without padding a batch of several shapes is
several forward passes. The trainer uses it for ``TrainConfig.pair_batch_size``.

*Retain text.* :class:`RetainData` holds ordinary text for the retain term (the
next-token KL to the original model): each text is encoded with the model's own BOS
rule and cut to its first ``tokens`` tokens, grouped by length like the examples, and
served the same seeded way (``epoch``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from icp_lens.model import HookedModel
from icp_lens.probes import ProbeExample, read_probes
from icp_lens.probeset import ProbeSet

__all__ = ["RetainData", "TrainBatch", "TrainData", "read_examples", "read_texts"]


def read_examples(data: str | Path | Sequence[ProbeExample], tokenizer: Any) -> list[ProbeExample]:
    """Probe-format examples from a JSONL path (tokenizer-checked) or a sequence of ``ProbeExample``."""
    if isinstance(data, (str, Path)):
        return read_probes(data, tokenizer=tokenizer)
    return list(data)


def read_texts(data: str | Path | Sequence[str | ProbeExample]) -> list[str]:
    """Plain texts for the retain pool: a ``.txt`` file (one text per non-empty line), a
    JSONL file (each line a string, or an object with ``"text"`` or ``"prompt"``), or a
    sequence of strings / ``ProbeExample`` (their prompts)."""
    import json

    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"retain pool {path} does not exist")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix != ".jsonl":
            return lines
        out = []
        for i, line in enumerate(lines):
            row = json.loads(line)
            if isinstance(row, str):
                out.append(row)
            elif isinstance(row, dict) and isinstance(row.get("text", row.get("prompt")), str):
                out.append(row.get("text", row.get("prompt")))
            else:
                raise ValueError(f"{path} line {i + 1}: expected a string or an object with 'text' or 'prompt'")
        return out
    out = []
    for i, item in enumerate(data):
        if isinstance(item, ProbeExample):
            out.append(item.prompt)
        elif isinstance(item, str):
            out.append(item)
        else:
            raise TypeError(f"retain item {i} is a {type(item).__name__}; expected a str or a ProbeExample")
    return out


@dataclass(frozen=True)
class TrainBatch:
    """Equal-length examples as tensors.

    ``candidates`` is ``[batch, 1 + n_alt]``: the answer first, then the alternatives,
    ``-1`` where an example has fewer. ``spurious`` is ``None`` unless every example of
    the batch has a spurious counterfactual. ``group_id`` is ``-1`` for examples without
    a group; ``weight`` is the per-example loss weight (1 unless JTT changed it).
    """

    index: Int[Tensor, " batch"]
    tokens: Int[Tensor, "batch pos"]
    answer: Int[Tensor, " batch"]
    candidates: Int[Tensor, "batch n"]
    spurious: Int[Tensor, "batch pos_s"] | None
    group_id: Int[Tensor, " batch"]
    weight: Float[Tensor, " batch"]

    @property
    def size(self) -> int:
        return int(self.index.shape[0])

    def head(self, n: int) -> TrainBatch:
        """The first ``n`` examples."""
        return TrainBatch(**{k: (v[:n] if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()})

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return TrainBatch(**moved)


@dataclass(frozen=True)
class _Shard:
    index: Tensor
    tokens: Tensor
    answer: Tensor
    candidates: Tensor
    spurious: Tensor | None
    group_id: Tensor


class TrainData:
    """Examples tokenized for ``model``; ``epoch(e, batch_size, seed)`` yields shuffled batches.

    The data and the shuffles live on the CPU (the orders come from a seeded CPU generator,
    the same on every device); the loop moves each batch to the model's device.
    """

    def __init__(self, model: HookedModel, examples: Sequence[ProbeExample]) -> None:
        if not examples:
            raise ValueError("Training data needs at least one example")
        self.examples: tuple[ProbeExample, ...] = tuple(examples)
        self.groups: tuple[str, ...] = tuple(sorted({ex.group for ex in self.examples if ex.group is not None}))
        group_of = {g: i for i, g in enumerate(self.groups)}
        probes = ProbeSet(model, self.examples, cf_length="right")
        shards = []
        for b in probes.batches(len(self.examples), device="cpu"):
            gid = torch.tensor([group_of[g] if g is not None else -1 for g in b.groups], dtype=torch.long, device="cpu")
            cands = torch.cat([b.answer[:, None], b.alternatives], dim=1)
            shards.append(_Shard(b.index, b.tokens, b.answer, cands, b.spurious, gid))
        self._shards = shards
        self.weights = torch.ones(len(self.examples), device="cpu")
        # example index -> (shard, row): mixed-shape batches regroup a global shuffle by shard
        self._where = torch.empty((len(self.examples), 2), dtype=torch.long, device="cpu")
        for k, shard in enumerate(shards):
            self._where[shard.index, 0] = k
            self._where[shard.index, 1] = torch.arange(len(shard.index), device="cpu")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_spurious(self) -> bool:
        """Whether every example has a spurious counterfactual."""
        return all(s.spurious is not None for s in self._shards)

    @property
    def n_with_spurious(self) -> int:
        return sum(len(s.index) for s in self._shards if s.spurious is not None)

    @property
    def has_groups(self) -> bool:
        return bool(self.groups)

    def with_weights(self, weights: Tensor) -> TrainData:
        """A copy that serves ``weights`` (one per example, in example order) in ``TrainBatch.weight``."""
        if weights.shape != (len(self),):
            raise ValueError(f"expected {len(self)} weights, got shape {tuple(weights.shape)}")
        new = object.__new__(TrainData)
        new.__dict__.update(self.__dict__)
        new.weights = weights.float().clone()
        return new

    def _take(self, shard: _Shard, rows: Tensor) -> TrainBatch:
        index = shard.index[rows]
        return TrainBatch(
            index=index,
            tokens=shard.tokens[rows],
            answer=shard.answer[rows],
            candidates=shard.candidates[rows],
            spurious=None if shard.spurious is None else shard.spurious[rows],
            group_id=shard.group_id[rows],
            weight=self.weights[index],
        )

    def n_batches(self, batch_size: int) -> int:
        """Batches per epoch."""
        return sum(-(-len(s.index) // batch_size) for s in self._shards)

    def epoch(self, epoch: int, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> list[TrainBatch]:
        """The batches of one epoch, in order; the same ``(seed, epoch)`` gives the same batches."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        batches = []
        for shard in self._shards:
            n = len(shard.index)
            order = torch.randperm(n, generator=gen, device="cpu") if shuffle else torch.arange(n, device="cpu")
            batches += [self._take(shard, order[i : i + batch_size]) for i in range(0, n, batch_size)]
        if shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen, device="cpu").tolist()]
        return batches

    def n_mixed_batches(self, batch_size: int) -> int:
        """Mixed-shape batches per epoch (:meth:`mixed_epoch`)."""
        return -(-len(self) // batch_size)

    def mixed_epoch(self, epoch: int, batch_size: int, *, seed: int = 0) -> list[list[TrainBatch]]:
        """The batches of one epoch, each of ``batch_size`` examples of any shape (the last may be smaller).

        All examples are shuffled together (from ``(seed, epoch)``) and cut into chunks of
        ``batch_size``; each chunk is a list of equal-shape sub-batches (in shard order),
        since rows of different lengths cannot share a forward pass without padding.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(len(self), generator=gen, device="cpu")
        out = []
        for start in range(0, len(self), batch_size):
            where = self._where[order[start : start + batch_size]]
            parts = []
            for k in where[:, 0].unique(sorted=True).tolist():
                parts.append(self._take(self._shards[k], where[where[:, 0] == k, 1]))
            out.append(parts)
        return out

    def batches(self, batch_size: int = 256) -> Iterator[TrainBatch]:
        """All examples in a fixed order (for evaluation)."""
        yield from self.epoch(0, batch_size, shuffle=False)

    def counterfactual_batches(self, batch_size: int = 256) -> Iterator[TrainBatch]:
        """The examples that have a spurious counterfactual, with the counterfactual as ``tokens``."""
        for b in self.batches(batch_size):
            if b.spurious is not None:
                yield replace(b, tokens=b.spurious, spurious=None)


class RetainData:
    """Ordinary texts for the retain term, tokenized for ``model`` and cut to ``tokens`` tokens.

    ``epoch(e, batch_size, seed)`` yields shuffled token tensors of one length each
    (texts shorter than ``tokens`` form their own shapes), the same for the same
    ``(seed, e)``. Texts that encode to fewer than 2 tokens (nothing to predict) are an error.
    """

    def __init__(self, model: HookedModel, texts: Sequence[str], tokens: int) -> None:
        from icp_lens.encoding import encode_texts

        texts = list(texts)
        if not texts:
            raise ValueError("the retain pool needs at least one text")
        if tokens < 2:
            raise ValueError(f"retain tokens must be >= 2, got {tokens}")
        encoded = [ids[:tokens] for ids in encode_texts(texts, model=model)]
        short = [i for i, ids in enumerate(encoded) if len(ids) < 2]
        if short:
            raise ValueError(f"retain texts {short[:5]} encode to fewer than 2 tokens: nothing to predict")
        self.texts = tuple(texts)
        self.tokens = tokens
        by_len: dict[int, list[list[int]]] = {}
        for ids in encoded:
            by_len.setdefault(len(ids), []).append(ids)
        shards = sorted(by_len.items(), reverse=True)  # on the CPU, like TrainData's; the loop moves each batch
        self._shards = [torch.tensor(rows, dtype=torch.long, device="cpu") for _, rows in shards]

    def __len__(self) -> int:
        return len(self.texts)

    def n_batches(self, batch_size: int) -> int:
        return sum(-(-len(s) // batch_size) for s in self._shards)

    def epoch(self, epoch: int, batch_size: int, *, seed: int = 0) -> list[Tensor]:
        """The token batches of one epoch, shuffled from ``(seed, epoch)``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        batches = []
        for shard in self._shards:
            order = torch.randperm(len(shard), generator=gen, device="cpu")
            batches += [shard[order[i : i + batch_size]] for i in range(0, len(shard), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen, device="cpu").tolist()]

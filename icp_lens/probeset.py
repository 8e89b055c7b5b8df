"""ProbeSet: probe examples tokenized for a model, batched without padding.

A probe set is where spuriousness is measured: prompts whose right next token is known,
each optionally with a *spurious counterfactual* (the spurious attribute changed, same
answer) and a *causal counterfactual* (the true cause changed, answer changed). This module
turns ``ProbeExample`` lists (from JSONL, a pandas frame or a ``datasets.Dataset``) into
tensors for one model:

* prompts are tokenized with the model's own rule (``to_tokens``: BOS prepended when the
  model expects it), answers as single tokens (``add_special_tokens=False``);
* examples are grouped by token length and batched within a length, so no padding token
  ever enters a forward pass (padding changes attention and position ids);
* **alignment rule**: a counterfactual must tokenize to the same length as its prompt, so
  position ``p`` of the prompt corresponds to position ``p`` of the counterfactual. A
  counterfactual of another length is rejected with an error naming the example, unless
  ``cf_length="right"``: then prompt and counterfactual are aligned on their final
  positions (-1 with -1, -2 with -2, ...) and only positions present in both are patched.

``ProbeSet.batches(batch_size)`` streams ``ProbeBatch`` objects; nothing about the whole
set is held in memory beyond its token ids.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from icp_lens.model import HookedModel
from icp_lens.probes import ProbeExample, ProbeFormatError, probes_from_frame, read_probes, single_token_id

__all__ = ["ProbeBatch", "ProbeSet"]


@dataclass(frozen=True)
class ProbeBatch:
    """Equal-length examples of a probe set, as tensors.

    ``alternatives`` is ``[batch, n_alt]`` padded with ``-1`` where examples have fewer.
    Counterfactual fields are ``None`` when the batch's examples do not all have one.
    """

    index: Int[Tensor, " batch"]
    tokens: Int[Tensor, "batch pos"]
    answer: Int[Tensor, " batch"]
    alternatives: Int[Tensor, "batch n_alt"]
    spurious: Int[Tensor, "batch pos_s"] | None
    causal: Int[Tensor, "batch pos_c"] | None
    causal_answer: Int[Tensor, " batch"] | None
    groups: tuple[str | None, ...]

    @property
    def size(self) -> int:
        return int(self.index.shape[0])


@dataclass
class _Encoded:
    tokens: list[int]
    answer: int
    alternatives: list[int]
    spurious: list[int] | None
    causal: list[int] | None
    causal_answer: int | None


class ProbeSet:
    """Probe examples tokenized for ``model``; build with ``from_jsonl``/``from_frame``/``from_dataset``."""

    def __init__(
        self,
        model: HookedModel,
        examples: Sequence[ProbeExample],
        *,
        cf_length: Literal["strict", "right"] = "strict",
    ) -> None:
        if not examples:
            raise ValueError("A ProbeSet needs at least one example")
        if cf_length not in ("strict", "right"):
            raise ValueError(f"cf_length must be 'strict' or 'right', got {cf_length!r}")
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("The model has no tokenizer; boot it with one to tokenize probes")
        self.examples: tuple[ProbeExample, ...] = tuple(examples)
        self.cf_length = cf_length
        self._encoded = [self._encode(model, tokenizer, i, ex) for i, ex in enumerate(self.examples)]

    def _encode(self, model: HookedModel, tokenizer: Any, i: int, ex: ProbeExample) -> _Encoded:
        def ids(text: str) -> list[int]:
            return model.to_tokens(text)[0].tolist()

        def token(text: str) -> int:
            try:
                return single_token_id(tokenizer, text)
            except (ValueError, ProbeFormatError) as err:
                raise ProbeFormatError(f"example {i}: {err}") from None

        tokens = ids(ex.prompt)
        cfs = {}
        for name in ("spurious_counterfactual", "causal_counterfactual"):
            text = getattr(ex, name)
            cf = ids(text) if text is not None else None
            if cf is not None and len(cf) != len(tokens) and self.cf_length == "strict":
                raise ProbeFormatError(
                    f"example {i}: {name} has {len(cf)} tokens, the prompt {len(tokens)}; counterfactuals "
                    "must align position by position (pass cf_length='right' to align final positions)\n"
                    f"  prompt: {ex.prompt!r}\n  {name}: {text!r}"
                )
            cfs[name] = cf
        return _Encoded(
            tokens=tokens,
            answer=token(ex.answer),
            alternatives=[token(a) for a in ex.alternatives],
            spurious=cfs["spurious_counterfactual"],
            causal=cfs["causal_counterfactual"],
            causal_answer=token(ex.causal_answer) if ex.causal_answer is not None else None,
        )

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_jsonl(cls, model: HookedModel, path: str | Path, **kwargs: Any) -> ProbeSet:
        """Read a probe file; an error about the i-th example names the file and its 1-based line."""
        import re

        examples = read_probes(path, tokenizer=model.tokenizer)
        try:
            return cls(model, examples, **kwargs)
        except ProbeFormatError as err:
            found = re.match(r"example (\d+): (.*)", str(err), re.S)
            if found is None:
                raise
            lines = [n for n, raw in enumerate(Path(path).read_bytes().splitlines(), start=1) if raw.strip()]
            raise ProbeFormatError(f"{path}, line {lines[int(found[1])]}: {found[2]}") from None

    @classmethod
    def from_frame(cls, model: HookedModel, frame: Any, **kwargs: Any) -> ProbeSet:
        return cls(model, probes_from_frame(frame), **kwargs)

    @classmethod
    def from_dataset(cls, model: HookedModel, dataset: Any, **kwargs: Any) -> ProbeSet:
        """From a ``datasets.Dataset`` with the probe-format columns."""
        return cls(model, probes_from_frame(dataset.to_pandas()), **kwargs)

    # -- access ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_spurious(self) -> bool:
        return all(e.spurious is not None for e in self._encoded)

    @property
    def has_causal(self) -> bool:
        return all(e.causal is not None for e in self._encoded)

    def batches(self, batch_size: int = 32, *, device: torch.device | str | None = None) -> Iterator[ProbeBatch]:
        """Equal-length batches in a fixed order (by length, then example index)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        by_shape: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for i, e in enumerate(self._encoded):
            key = (len(e.tokens), len(e.spurious or ()), len(e.causal or ()))
            by_shape[key].append(i)
        for key in sorted(by_shape):
            members = by_shape[key]
            for start in range(0, len(members), batch_size):
                yield self._batch(members[start : start + batch_size], device)

    def _batch(self, idx: list[int], device: torch.device | str | None) -> ProbeBatch:
        enc = [self._encoded[i] for i in idx]

        def tensor(values: list[Any]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        n_alt = max(len(e.alternatives) for e in enc)
        alts = [e.alternatives + [-1] * (n_alt - len(e.alternatives)) for e in enc]
        spurious = tensor([e.spurious for e in enc]) if all(e.spurious is not None for e in enc) else None
        causal = tensor([e.causal for e in enc]) if all(e.causal is not None for e in enc) else None
        has_ca = all(e.causal_answer is not None for e in enc)
        return ProbeBatch(
            index=tensor(idx),
            tokens=tensor([e.tokens for e in enc]),
            answer=tensor([e.answer for e in enc]),
            alternatives=tensor(alts),
            spurious=spurious,
            causal=causal,
            causal_answer=tensor([e.causal_answer for e in enc]) if has_ca else None,
            groups=tuple(self.examples[i].group for i in idx),
        )

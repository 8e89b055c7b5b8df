"""Predictions: what a model chooses on each probe example and its counterfactuals.

Evaluation reads a model through one forward pass per prompt: the next-token logits at
the last position, restricted to the example's *candidates* (``answer`` first, then
``alternatives``). From those logits, per example:

- ``choice``: the candidate with the highest logit (ties go to the earlier candidate);
  ``correct = choice == answer``;
- ``confidence``: the choice's probability under the softmax over the candidates only;
- ``margin = logit(answer) - max logit(alternatives)``: positive iff correct.

The same is recorded on the *spurious counterfactual* (only the spurious attribute
changed: the answer should not move) and on the *causal counterfactual* (the true
cause changed: the right answer becomes ``causal_answer``). Counterfactual margins are
taken with the **original** answer and alternatives, so ``|margin_cf - margin|`` is how
far the counterfactual moves the model's preference. On the causal counterfactual the
choice is made among the candidates plus ``causal_answer`` when it is not one of them.

:func:`predict_examples` runs any causal LM (a Hugging Face model, a
``TransformerBridge`` or a ``HookedTransformer``) under ``torch.no_grad`` with no hooks,
encoding prompts as :func:`icp_lens.organisms.train.predict` does (``model.to_tokens``
when the model has it, else the tokenizer with special tokens) and batching by token
length, so no padding enters a forward pass. :meth:`Predictions.from_logits` builds the
same object from logits you already have.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Shaped

from icp_lens.devices import input_device
from icp_lens.encoding import encode_texts
from icp_lens.probes import ProbeExample, single_token_id

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Predictions", "predict_examples"]


def _candidates(ex: ProbeExample) -> tuple[str, ...]:
    return (ex.answer, *ex.alternatives)


def _causal_candidates(ex: ProbeExample) -> tuple[str, ...]:
    cands = _candidates(ex)
    if ex.causal_answer is None or ex.causal_answer in cands:
        return cands
    return (*cands, ex.causal_answer)


def _margin(logits: np.ndarray | None, k: int) -> float:
    """``logit(answer) - max logit(alternatives)`` over the first ``k`` candidates."""
    return np.nan if logits is None else float(logits[0] - logits[1:k].max())


def _choice(logits: np.ndarray | None, cands: tuple[str, ...]) -> str | None:
    return None if logits is None else cands[int(np.argmax(logits))]


@dataclass(frozen=True, eq=False)
class Predictions:
    """Candidate logits of every probe example on its prompt and its counterfactuals.

    ``logits[i]`` holds the logits of ``(answer, *alternatives)`` of example ``i`` on its
    prompt; ``logits_spurious_cf[i]`` the same on its spurious counterfactual (``None``
    without one); ``logits_causal_cf[i]`` on its causal counterfactual, with
    ``causal_answer`` appended when it is not already a candidate. The per-example
    arrays (``choice``, ``correct``, ``confidence``, ``margin``, ...) derive from them;
    :meth:`to_frame` lays them out one row per example.
    """

    examples: tuple[ProbeExample, ...]
    logits: tuple[Float[np.ndarray, " n_candidates"], ...]
    logits_spurious_cf: tuple[Float[np.ndarray, " n_candidates"] | None, ...]
    logits_causal_cf: tuple[Float[np.ndarray, " n_causal_candidates"] | None, ...]

    def __post_init__(self) -> None:
        n = len(self.examples)
        if n == 0:
            raise ValueError("Predictions need at least one example")
        for name in ("logits", "logits_spurious_cf", "logits_causal_cf"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} examples")
        for i, ex in enumerate(self.examples):
            checks = (
                ("logits", self.logits[i], _candidates(ex), True),
                ("logits_spurious_cf", self.logits_spurious_cf[i], _candidates(ex), ex.spurious_counterfactual),
                ("logits_causal_cf", self.logits_causal_cf[i], _causal_candidates(ex), ex.causal_counterfactual),
            )
            for name, row, cands, expected in checks:
                if row is None and expected is not None:
                    raise ValueError(f"example {i} has a counterfactual but {name}[{i}] is None")
                if row is not None and expected is None:
                    raise ValueError(f"{name}[{i}] holds logits but example {i} has no such counterfactual")
                if row is not None and np.shape(row) != (len(cands),):
                    raise ValueError(f"example {i}: {name} needs one logit per candidate {cands}, got {np.shape(row)}")

    @classmethod
    def from_logits(
        cls,
        examples: Sequence[ProbeExample],
        logits: Sequence[Sequence[float]],
        logits_spurious_cf: Sequence[Sequence[float] | None] | None = None,
        logits_causal_cf: Sequence[Sequence[float] | None] | None = None,
    ) -> Predictions:
        """Predictions from candidate logits you already have (``None`` = no counterfactual)."""
        n = len(examples)

        def rows(values: Sequence[Sequence[float] | None] | None) -> tuple[np.ndarray | None, ...]:
            values = [None] * n if values is None else values
            return tuple(None if v is None else np.asarray(v, dtype=np.float32) for v in values)

        return cls(tuple(examples), rows(logits), rows(logits_spurious_cf), rows(logits_causal_cf))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.examples)

    @cached_property
    def answer(self) -> Shaped[np.ndarray, " n"]:
        return np.array([ex.answer for ex in self.examples], dtype=object)

    @cached_property
    def group(self) -> Shaped[np.ndarray, " n"]:
        return np.array([ex.group for ex in self.examples], dtype=object)

    def _each(self, rows: tuple[np.ndarray | None, ...], fn: Any, dtype: Any = float) -> np.ndarray:
        return np.array([fn(row, ex) for row, ex in zip(rows, self.examples, strict=True)], dtype=dtype)

    @cached_property
    def choice(self) -> Shaped[np.ndarray, " n"]:
        """The argmax candidate on each prompt."""
        return self._each(self.logits, lambda lg, ex: _choice(lg, _candidates(ex)), object)

    @cached_property
    def correct(self) -> Bool[np.ndarray, " n"]:
        return (self.choice == self.answer).astype(bool)

    @cached_property
    def confidence(self) -> Float[np.ndarray, " n"]:
        """Probability of the choice, softmax over the candidates."""
        out = np.empty(len(self))
        for i, lg in enumerate(self.logits):
            z = np.asarray(lg, dtype=np.float64)
            p = np.exp(z - z.max())
            out[i] = p.max() / p.sum()
        return out

    @cached_property
    def margin(self) -> Float[np.ndarray, " n"]:
        return self._each(self.logits, lambda lg, ex: _margin(lg, len(lg)))

    @cached_property
    def choice_spurious_cf(self) -> Shaped[np.ndarray, " n"]:
        """Choice on the spurious counterfactual (``None`` without one)."""
        return self._each(self.logits_spurious_cf, lambda lg, ex: _choice(lg, _candidates(ex)), object)

    @cached_property
    def margin_spurious_cf(self) -> Float[np.ndarray, " n"]:
        """Original answer's margin on the spurious counterfactual (NaN without one)."""
        return self._each(self.logits_spurious_cf, lambda lg, ex: _margin(lg, len(_candidates(ex))))

    @cached_property
    def flipped(self) -> Shaped[np.ndarray, " n"]:
        """Whether the spurious counterfactual changes the choice (``None`` without one)."""
        pairs = zip(self.choice, self.choice_spurious_cf, strict=True)
        return np.array([None if q is None else bool(p != q) for p, q in pairs], dtype=object)

    @cached_property
    def choice_causal_cf(self) -> Shaped[np.ndarray, " n"]:
        """Choice on the causal counterfactual (candidates + ``causal_answer``; ``None`` without one)."""
        return self._each(self.logits_causal_cf, lambda lg, ex: _choice(lg, _causal_candidates(ex)), object)

    @cached_property
    def margin_causal_cf(self) -> Float[np.ndarray, " n"]:
        """Original answer's margin on the causal counterfactual (NaN without one)."""
        return self._each(self.logits_causal_cf, lambda lg, ex: _margin(lg, len(_candidates(ex))))

    @cached_property
    def correct_causal_cf(self) -> Shaped[np.ndarray, " n"]:
        """``choice_causal_cf == causal_answer`` (``None`` without a causal answer)."""

        def hit(choice: str | None, ex: ProbeExample) -> bool | None:
            return None if choice is None or ex.causal_answer is None else choice == ex.causal_answer

        return self._each(tuple(self.choice_causal_cf), hit, object)

    def to_frame(self) -> pd.DataFrame:
        """One row per example: its fields, choices, confidences and margins."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "prompt": [ex.prompt for ex in self.examples],
                "group": self.group,
                "answer": self.answer,
                "alternatives": [list(ex.alternatives) for ex in self.examples],
                "logits": [lg.tolist() for lg in self.logits],
                "choice": self.choice,
                "correct": self.correct,
                "confidence": self.confidence,
                "margin": self.margin,
                "choice_spurious_cf": self.choice_spurious_cf,
                "margin_spurious_cf": self.margin_spurious_cf,
                "flipped": pd.array(list(self.flipped), dtype="boolean"),
                "causal_answer": [ex.causal_answer for ex in self.examples],
                "choice_causal_cf": self.choice_causal_cf,
                "correct_causal_cf": pd.array(list(self.correct_causal_cf), dtype="boolean"),
                "margin_causal_cf": self.margin_causal_cf,
            }
        )
        return frame


def _candidate_logits(
    model: Any, tokenizer: Any, prompts: Sequence[str], candidate_ids: Sequence[Sequence[int]], batch_size: int
) -> list[np.ndarray]:
    """Last-position logits of each prompt at its candidate token ids (batched by length)."""
    device = input_device(model)
    encoded = encode_texts(list(prompts), model=model, tokenizer=tokenizer)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(prompts)
    for idxs in by_len.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            result = model(ids)
            last = (result.logits if hasattr(result, "logits") else result)[:, -1, :].float().cpu()
            for row, i in enumerate(chunk):
                out[i] = last[row, list(candidate_ids[i])].numpy().copy()
    return out


@torch.no_grad()
def predict_examples(
    model: Any, tokenizer: Any, examples: Sequence[ProbeExample], *, batch_size: int = 256,
    data_parallel: bool = False,
) -> Predictions:  # fmt: skip
    """Run ``model`` on every prompt, spurious and causal counterfactual of ``examples``.

    Three sweeps (prompts; the spurious counterfactuals that exist; the causal ones),
    each one forward pass per batch of equal-length prompts. Every answer, alternative
    and causal answer must be a single token of ``tokenizer`` (``ValueError`` otherwise).
    The model's train/eval mode is left as it is: evaluate a model in eval mode.

    ``data_parallel=True`` inside a ``torch.distributed`` process group (torchrun): rank
    ``r`` runs the examples ``r, r+N, ...`` and the candidate logits are summed across
    ranks (zeros from the ranks that did not run an example), so every rank returns the
    one-process predictions.
    """
    if not examples:
        raise ValueError("predict_examples needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from icp_lens.distributed import current, split

    ranks = current() if data_parallel else None
    if ranks is not None:
        mine = split(range(len(examples)), ranks)
        local = predict_examples(model, tokenizer, [examples[i] for i in mine], batch_size=batch_size) if mine else None
        return _gather_predictions(tuple(examples), mine, local)
    token_of: dict[str, int] = {}

    def ids_of(cands: tuple[str, ...]) -> list[int]:
        for c in cands:
            if c not in token_of:
                token_of[c] = single_token_id(tokenizer, c)
        return [token_of[c] for c in cands]

    logits = _candidate_logits(
        model, tokenizer, [ex.prompt for ex in examples], [ids_of(_candidates(ex)) for ex in examples], batch_size
    )
    spurious: list[np.ndarray | None] = [None] * len(examples)
    causal: list[np.ndarray | None] = [None] * len(examples)
    for field, store, cands_of in (
        ("spurious_counterfactual", spurious, _candidates),
        ("causal_counterfactual", causal, _causal_candidates),
    ):
        idx = [i for i, ex in enumerate(examples) if getattr(ex, field) is not None]
        if not idx:
            continue
        prompts = [getattr(examples[i], field) for i in idx]
        found = _candidate_logits(model, tokenizer, prompts, [ids_of(cands_of(examples[i])) for i in idx], batch_size)
        for i, row in zip(idx, found, strict=True):
            store[i] = row
    return Predictions(tuple(examples), tuple(logits), tuple(spurious), tuple(causal))


def _gather_predictions(examples: tuple[ProbeExample, ...], mine: list[int], local: Predictions | None) -> Predictions:
    """Every rank's predictions of its examples, put together on every rank."""
    from icp_lens.distributed import gather_rows

    def stack(rows: Sequence[np.ndarray | None]) -> torch.Tensor:
        width = max(len(_causal_candidates(ex)) for ex in examples)
        out = torch.zeros((len(rows), width), dtype=torch.float64, device="cpu")  # gathered from numpy rows
        for i, row in enumerate(rows):
            if row is not None:
                out[i, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.float64))
        return out

    def unstack(full: torch.Tensor, lengths: Sequence[int | None]) -> tuple[np.ndarray | None, ...]:
        return tuple(None if k is None else full[i, :k].numpy().astype(np.float32) for i, k in enumerate(lengths))

    parts = (local.logits, local.logits_spurious_cf, local.logits_causal_cf) if local is not None else ((), (), ())
    logits, spurious, causal = (gather_rows(stack(p), mine, len(examples)) for p in parts)
    widths = [len(_candidates(ex)) for ex in examples]
    spurious_widths = [k if ex.spurious_counterfactual is not None else None
                       for k, ex in zip(widths, examples, strict=True)]  # fmt: skip
    return Predictions(
        examples,
        unstack(logits, widths),
        unstack(spurious, spurious_widths),
        unstack(causal, [len(_causal_candidates(ex)) if ex.causal_counterfactual is not None else None
                         for ex in examples]),
    )  # fmt: skip

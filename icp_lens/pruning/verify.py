"""Verification: does the exported checkpoint compute what the hook ablation computed?

The edited weights are reloaded with ``transformers`` alone (no icp_lens code on the
path of the computation) and run on verification inputs; the same inputs go through
the *original* model with the plan's features ablated at run time, by the scorer's
own hooks on a hooked model (``TransformerBridge`` / ``HookedTransformer``) or by
module hooks on a plain HF model. The largest absolute logit difference is the
figure to trust: in fp32 it should be round-off (<= 1e-5). The report adds the share
of parameters the plan zeroed, the size of the weight files and the forward latency
before and after (the same: pruning by zeroing keeps every shape).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from icp_lens.edits import run_with_edits
from icp_lens.encoding import encode_texts, length_batches
from icp_lens.pruning.ablate import hf_ablation, plan_edits
from icp_lens.pruning.plan import PrunePlan
from icp_lens.pruning.source import load_checkpoint

__all__ = ["VerificationReport", "verify_export", "verification_batches", "forward_latency_ms"]


@dataclass(frozen=True)
class VerificationReport:
    """The exported checkpoint against the hook-ablated original."""

    max_abs_logit_diff: float
    tolerance: float
    n_inputs: int
    n_tokens: int
    reference: str  # "hooks" (icp_lens hook ablation) or "module hooks" (plain HF)
    zeroed_fraction: float | None = None
    file_size_bytes: int | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"metric": list(self.to_dict()), "value": list(self.to_dict().values())})

    def __str__(self) -> str:
        lines = [
            f"max |logit diff| {self.max_abs_logit_diff:.2e} (tolerance {self.tolerance:.0e}): "
            + ("PASS" if self.passed else "FAIL")
            + f", {self.n_inputs} inputs / {self.n_tokens} tokens, reference: {self.reference}"
        ]
        if self.zeroed_fraction is not None:
            lines.append(f"parameters zeroed: {100 * self.zeroed_fraction:.4f}%")
        if self.file_size_bytes is not None:
            lines.append(f"weight files: {self.file_size_bytes / 2**20:.2f} MiB")
        if self.latency_before_ms is not None and self.latency_after_ms is not None:
            lines.append(
                f"forward latency: {self.latency_before_ms:.2f} ms before, {self.latency_after_ms:.2f} ms after"
            )
        return "\n".join(lines)


def verification_batches(
    model: Any,
    *,
    prompts: Sequence[str] | None = None,
    tokenizer: Any = None,
    n_random: int = 8,
    length: int = 12,
    batch_size: int = 16,
    seed: int = 0,
) -> list[Tensor]:
    """Token batches to verify on: ``prompts`` encoded as the model does, else random ids.

    Random ids (seeded) exercise every position without depending on a tokenizer.
    """
    if prompts:
        encoded = encode_texts(list(prompts), model=model if hasattr(model, "hook_dict") else None, tokenizer=tokenizer)
        return [tokens for _, tokens in length_batches(encoded, batch_size)]
    vocab = _vocab_size(model)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or length
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n_random, min(length, limit)), generator=gen)]


def _vocab_size(model: Any) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return int(getattr(cfg, "d_vocab", None) or cfg.vocab_size)


def _logits(out: Any) -> Tensor:
    return (out.logits if hasattr(out, "logits") else out).float()


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def forward_latency_ms(model: nn.Module, batches: Sequence[Tensor], *, repeats: int = 3) -> float:
    """Median wall time (ms) of one forward pass over all ``batches`` (after one warm-up pass)."""
    for tokens in batches[:1]:
        model(tokens.to(_device(model)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for tokens in batches:
            model(tokens.to(_device(model)))
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def _reference_logits(reference: Any, plan: PrunePlan, tokens: Tensor) -> Tensor:
    tokens = tokens.to(_device(reference))
    if hasattr(reference, "hook_dict"):
        return run_with_edits(reference, tokens, plan_edits(plan)).float().cpu()
    means = None if plan.means is None else dict(zip(plan.features, plan.means, strict=True))
    with hf_ablation(reference, plan.features, means):
        return _logits(reference(tokens)).cpu()


def weight_file_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


@torch.no_grad()
def verify_export(
    reference: Any,
    plan: PrunePlan,
    out: str | Path,
    *,
    batches: Sequence[Tensor] | None = None,
    tolerance: float = 1e-5,
    zeroed_fraction: float | None = None,
    latency_before_ms: float | None = None,
) -> VerificationReport:
    """Compare the checkpoint at ``out`` with ``reference`` (the original) ablated per ``plan``.

    ``reference`` is a hooked model (bridge or HookedTransformer) or an HF model that
    has *not* been edited. ``batches`` default to ``verification_batches(reference)``.
    """
    exported = load_checkpoint(out)
    batches = list(batches) if batches is not None else verification_batches(reference)
    worst = 0.0
    n_inputs = n_tokens = 0
    for tokens in batches:
        expected = _reference_logits(reference, plan, tokens)
        got = _logits(exported(tokens.to(_device(exported)))).cpu()
        if got.shape != expected.shape:
            raise RuntimeError(f"Exported logits have shape {tuple(got.shape)}, the reference {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max()))
        n_inputs += tokens.shape[0]
        n_tokens += tokens.numel()
    return VerificationReport(
        max_abs_logit_diff=worst,
        tolerance=tolerance,
        n_inputs=n_inputs,
        n_tokens=n_tokens,
        reference="hooks" if hasattr(reference, "hook_dict") else "module hooks",
        zeroed_fraction=zeroed_fraction,
        file_size_bytes=weight_file_bytes(out),
        latency_before_ms=latency_before_ms,
        latency_after_ms=forward_latency_ms(exported, batches) if latency_before_ms is not None else None,
    )

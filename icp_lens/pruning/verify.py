"""Verification: does the exported checkpoint compute what the hook ablation computed?

The edited weights are reloaded with ``transformers`` alone (no icp_lens code on the
path of the computation) and run on verification inputs; the same inputs go through
the *original* model with the plan's features ablated at run time, by the scorer's
own hooks on a hooked model (``TransformerBridge`` / ``HookedTransformer``) or by
module hooks on a plain HF model. The largest absolute logit difference is the
figure to trust: in fp32 it should be round-off (<= 1e-5). The report adds the share
of parameters the plan zeroed, the size of the weight files and the forward latency
before and after (the same: pruning by zeroing keeps every shape).

Token-embedding features are ablated in the reference by replacing the embedding
*activation* at the positions holding the token (a forward hook on the input-embedding
module; ``hook_embed`` on a hooked model), which leaves a tied unembedding as it was:
so an export that forgot to untie it, or edited the output side, fails here.
"""

from __future__ import annotations

import contextlib
import copy
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
from icp_lens.pruning.tokens import hooked_token_ablation, token_ablation

__all__ = [
    "VerificationReport",
    "verify_export",
    "verification_batches",
    "forward_latency_ms",
    "interleaved_latency_ms",
    "write_report",
    "REPORT_FILE",
]

#: the verification report written into every verified checkpoint
REPORT_FILE = "verification.json"


@dataclass(frozen=True)
class VerificationReport:
    """The exported checkpoint against the run-time-ablated original.

    ``max_abs_logit_diff`` compares the reloaded checkpoint with the original HF model
    ablated by module hooks: the same implementation on both sides, so it measures the
    weight edit alone (fp32 round-off, <= ``tolerance``). When a hooked model (bridge or
    HookedTransformer) is available, ``hooked_max_abs_logit_diff`` also compares with the
    scorer's own hook ablation, and ``implementation_floor`` is how far that hooked model
    and the HF model already differ *without* any ablation (different kernels and
    operation order; about 4e-5 on a 30-layer model in fp32). The hooked comparison
    passes when it stays within ``tolerance + 2 * implementation_floor``.

    Mean mode moves ``mean @ W`` from the matrix product into the bias: the same number
    in exact arithmetic, but a different rounding in fp32 (and the folded bias itself is
    stored rounded to fp32), which 30 layers amplify to a few 1e-5 on the logits of a
    real model; zero mode is exact. So when the fp32 figure exceeds ``tolerance`` two
    more figures are computed: ``rounding_floor``, how far fp32 rounding alone moves the
    reference (the ablated original in fp32 against the same in float64), and
    ``fp64_max_abs_logit_diff``, the export against the reference with both run in
    float64 (what is left is the fp32 storage of the folded bias). The edit passes when
    the fp32 difference is within ``tolerance + 2 * rounding_floor``: the checkpoint
    differs from the hook ablation by no more than rounding moves the hook ablation itself.

    The hooked comparison's allowance scales with the measured floor the same way:
    ``tolerance + HOOKED_FLOOR_FACTOR * implementation_floor``. The floor is measured with
    no ablation, and two implementations of the same *ablated* computation drift further
    apart than of the unablated one (a 64-feature SmolLM2 prune: 4.2e-4 against a floor
    of 1.1e-4), so the factor is 8, not 2; an export that ablates even one wrong feature
    differs by orders of magnitude more (the tests show both on SmolLM2). Each comparison
    has its own line, PASS/FAIL and allowance in ``str(report)``; ``subject`` says what
    was verified (``"prune"``: the original ablated per the plan; ``"fine-tune"``: the
    trained model, with the plan's edits if it has any).
    """

    max_abs_logit_diff: float
    tolerance: float
    n_inputs: int
    n_tokens: int
    hooked_max_abs_logit_diff: float | None = None
    implementation_floor: float | None = None
    fp64_max_abs_logit_diff: float | None = None
    rounding_floor: float | None = None
    zeroed_fraction: float | None = None
    file_size_bytes: int | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    subject: str = "prune"
    hooked_floor_factor: float = 8.0

    @property
    def edit_allowance(self) -> float:
        """What the checkpoint may differ from the module-hook reference: tolerance + 2 x fp32 rounding floor."""
        return self.tolerance + 2 * (self.rounding_floor or 0.0)

    @property
    def hooked_allowance(self) -> float | None:
        """What it may differ from icp_lens's hook edits: tolerance + factor x implementation floor."""
        if self.hooked_max_abs_logit_diff is None:
            return None
        return self.tolerance + self.hooked_floor_factor * (self.implementation_floor or 0.0)

    @property
    def edit_passed(self) -> bool:
        return self.max_abs_logit_diff <= self.edit_allowance

    @property
    def hooked_passed(self) -> bool | None:
        allowance = self.hooked_allowance
        return None if allowance is None else self.hooked_max_abs_logit_diff <= allowance  # type: ignore[operator]

    @property
    def passed(self) -> bool:
        return self.edit_passed and self.hooked_passed is not False

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__, "passed": self.passed, "edit_allowance": self.edit_allowance,
            "edit_passed": self.edit_passed, "hooked_allowance": self.hooked_allowance,
            "hooked_passed": self.hooked_passed,
        }  # fmt: skip

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"metric": list(self.to_dict()), "value": list(self.to_dict().values())})

    def __str__(self) -> str:
        def verdict(ok: bool | None) -> str:
            return "PASS" if ok else "FAIL"

        if self.subject == "fine-tune":
            module_ref, hook_ref = "the trained model (plan edits, if any, by module hooks)", "the trained bridge"
        else:
            module_ref, hook_ref = "the original with the plan ablated by module hooks", "icp_lens's hook ablation"
        rounding = f" + 2 x fp32 rounding floor {self.rounding_floor:.1e}" if self.rounding_floor is not None else ""
        lines = [
            f"checkpoint vs {module_ref}: max |logit diff| {self.max_abs_logit_diff:.2e}, allowed "
            f"{self.edit_allowance:.2e} (tolerance {self.tolerance:.0e}{rounding}): {verdict(self.edit_passed)}"
        ]
        if self.rounding_floor is not None:
            lines.append(
                f"  in float64 the checkpoint differs by {self.fp64_max_abs_logit_diff:.2e} "
                "(fp32 storage of folded biases)"
            )
        if self.hooked_max_abs_logit_diff is not None:
            lines.append(
                f"checkpoint vs {hook_ref}: max |logit diff| {self.hooked_max_abs_logit_diff:.2e}, allowed "
                f"{self.hooked_allowance:.2e} (tolerance {self.tolerance:.0e} + {self.hooked_floor_factor:g} x "
                f"implementation floor {self.implementation_floor or 0.0:.1e}, the hooked model vs HF with no edit): "
                + verdict(self.hooked_passed)
            )
        lines.append(f"verification: {verdict(self.passed)} on {self.n_inputs} inputs / {self.n_tokens} tokens")
        if self.zeroed_fraction is not None:
            lines.append(f"parameters zeroed: {100 * self.zeroed_fraction:.4f}%")
        if self.file_size_bytes is not None:
            lines.append(f"weight files: {self.file_size_bytes / 2**20:.2f} MiB")
        if self.latency_before_ms is not None and self.latency_after_ms is not None:
            lines.append(
                f"forward latency (median of 5 interleaved runs): {self.latency_before_ms:.2f} ms before, "
                f"{self.latency_after_ms:.2f} ms after"
            )
        return "\n".join(lines)


def write_report(directory: str | Path, report: VerificationReport) -> Path:
    """Write ``report`` as ``directory/verification.json`` (the figures, allowances and verdicts)."""
    import json
    import math

    payload = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.to_dict().items()}
    path = Path(directory) / REPORT_FILE
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


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

    Random ids (seeded) exercise every position without depending on a tokenizer. The
    batches are on the CPU: the models compared may sit on different devices, and each
    run moves them.
    """
    if prompts:
        encoded = encode_texts(list(prompts), model=model if hasattr(model, "hook_dict") else None, tokenizer=tokenizer)
        return [tokens for _, tokens in length_batches(encoded, batch_size, device="cpu")]
    vocab = _vocab_size(model)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or length
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n_random, min(length, limit)), generator=gen, device="cpu")]


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
def interleaved_latency_ms(
    first: nn.Module, second: nn.Module, batches: Sequence[Tensor], *, repeats: int = 5
) -> tuple[float, float]:
    """Median wall time (ms) of a forward pass over ``batches`` for two models, measured alternately.

    One warm-up pass each, then ``repeats`` rounds of first-then-second, so load on the
    machine affects both alike; a single run per model says nothing about speed.
    """
    for model in (first, second):
        for tokens in batches[:1]:
            model(tokens.to(_device(model)))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for model, bucket in zip((first, second), times, strict=True):
            start = time.perf_counter()
            for tokens in batches:
                model(tokens.to(_device(model)))
            bucket.append(1e3 * (time.perf_counter() - start))
    return tuple(sorted(t)[len(t) // 2] for t in times)  # type: ignore[return-value]


def _hf_ablated_logits(original: nn.Module, plan: PrunePlan, tokens: Tensor, dtype=torch.float32) -> Tensor:
    means = None if plan.means is None else dict(zip(plan.features, plan.means, strict=True))
    with hf_ablation(original, plan.features, means), token_ablation(original, plan.tokens), _hf_dirs(original, plan):
        out = original(tokens.to(_device(original)))
        return (out.logits if hasattr(out, "logits") else out).to(dtype).cpu()


def _hf_dirs(model: nn.Module, plan: PrunePlan) -> Any:
    """The plan's direction edits as module hooks on the HF model (a no-op without directions)."""
    if plan.directions is None:
        return contextlib.nullcontext()
    from icp_lens.directions import hf_directions

    return hf_directions(model, plan.directions, mode=plan.direction_mode)


def _hooked_dirs(model: Any, plan: PrunePlan) -> Any:
    """The plan's direction edits as icp_lens hooks on the hooked model (a no-op without directions)."""
    if plan.directions is None:
        return contextlib.nullcontext()
    from icp_lens.directions import applying_directions

    return applying_directions(model, plan.directions, mode=plan.direction_mode)


def weight_file_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


@torch.no_grad()
def verify_export(
    original: nn.Module,
    plan: PrunePlan,
    out: str | Path,
    *,
    hooked: Any = None,
    batches: Sequence[Tensor] | None = None,
    tolerance: float = 1e-5,
    zeroed_fraction: float | None = None,
    latency_before_ms: float | None = None,
    subject: str = "prune",
    device: torch.device | str | None = None,
) -> VerificationReport:
    """Compare the checkpoint at ``out`` with the *unedited* HF model ``original`` ablated per ``plan``.

    ``hooked`` (a bridge or HookedTransformer of the same model) adds the comparison with
    icp_lens's hook ablation. ``batches`` default to ``verification_batches``. The exported
    checkpoint is loaded onto ``device`` (default: ``original``'s device); the float64
    re-check, when the float32 one misses the tolerance, runs on the CPU.
    """
    exported = load_checkpoint(out).to(device if device is not None else _device(original))
    if batches is None:
        batches = verification_batches(hooked if hooked is not None else original)
    worst = 0.0
    hooked_worst = floor = None if hooked is None else 0.0
    n_inputs = n_tokens = 0
    for tokens in batches:
        got = _logits(exported(tokens.to(_device(exported)))).cpu()
        expected = _hf_ablated_logits(original, plan, tokens)
        if got.shape != expected.shape:
            raise RuntimeError(f"Exported logits have shape {tuple(got.shape)}, the reference {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max()))
        if hooked is not None:
            hooked_tokens = tokens.to(_device(hooked))
            with hooked_token_ablation(hooked, hooked_tokens, plan.tokens), _hooked_dirs(hooked, plan):
                via_hooks = run_with_edits(hooked, hooked_tokens, plan_edits(plan)).float().cpu()
            hooked_worst = max(hooked_worst, float((got - via_hooks).abs().max()))
            plain_hf = _logits(original(tokens.to(_device(original)))).cpu()
            floor = max(floor, float((_logits(hooked(hooked_tokens)).cpu() - plain_hf).abs().max()))
        n_inputs += tokens.shape[0]
        n_tokens += tokens.numel()
    fp64 = rounding = None
    if worst > tolerance:
        exported64 = load_checkpoint(out, dtype=torch.float64)
        original64 = copy.deepcopy(original).to("cpu", torch.float64)
        fp64 = rounding = 0.0
        for tokens in batches:
            reference64 = _hf_ablated_logits(original64, plan, tokens, dtype=torch.float64)
            got = exported64(tokens.to(_device(exported64))).logits.cpu()
            fp64 = max(fp64, float((got - reference64).abs().max()))
            reference32 = _hf_ablated_logits(original, plan, tokens, dtype=torch.float64)
            rounding = max(rounding, float((reference32 - reference64).abs().max()))
        del exported64, original64
    latency = (None, None)
    if latency_before_ms is not None:  # a request: both models, interleaved, median of repeats
        latency = interleaved_latency_ms(original, exported, batches)
    return VerificationReport(
        max_abs_logit_diff=worst,
        fp64_max_abs_logit_diff=fp64,
        rounding_floor=rounding,
        tolerance=tolerance,
        n_inputs=n_inputs,
        n_tokens=n_tokens,
        hooked_max_abs_logit_diff=hooked_worst,
        implementation_floor=floor,
        zeroed_fraction=zeroed_fraction,
        file_size_bytes=weight_file_bytes(out),
        latency_before_ms=latency[0],
        latency_after_ms=latency[1],
        subject=subject,
    )

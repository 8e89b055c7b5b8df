"""Which attention kernel a training run uses, and a context manager that sets it for the run.

A Hugging Face model loaded with its defaults computes attention with PyTorch's
``scaled_dot_product_attention`` (``"sdpa"``). On the CPU that dispatches to a flash-style
kernel that loops over blocks of (row, head, query) and pays off on long sequences; on
short ones, the plain ``softmax(QK^T / sqrt(d)) V`` of ``"eager"`` attention (a few batched
matrix products) is faster, and more so the more rows a step stacks. Measured on 2 CPU
cores, forward and backward of a 2-layer Llama (hidden 64 with 2 heads, 144 rows; hidden 576
with 9 heads, 8 rows): eager 5-11% faster at 19 and 64 positions, the two within 3% at 128,
sdpa 22-41% faster at 256. On the multimodal organism (19 positions, a CLIP tower of 17), a CIMRL step
(144 stacked rows) took 91-104 ms under eager against 112-127 ms under sdpa, an ERM step
(64 rows) 56-60 ms against 60-65 ms (``benchmarks/bench_cimrl_step.py`` prints both).

``"auto"`` is therefore: eager on the CPU for sequences shorter than
:data:`EAGER_MAX_POSITIONS`, the model's own kernel otherwise (GPUs have fused kernels for
both regimes). The two kernels compute the same function; their results differ by
float rounding only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args

__all__ = ["Attention", "ATTENTION_CHOICES", "EAGER_MAX_POSITIONS", "resolve_attention", "attention_kernel"]

Attention = Literal["auto", "model", "eager", "sdpa"]
ATTENTION_CHOICES: tuple[str, ...] = get_args(Attention)
#: sequences shorter than this many positions train with eager attention on the CPU under ``"auto"``
EAGER_MAX_POSITIONS = 128


def resolve_attention(choice: str, *, device_type: str, positions: int) -> str | None:
    """The kernel to set for a run (``None``: keep the model's own).

    ``choice``: ``"auto"`` (eager on the CPU below :data:`EAGER_MAX_POSITIONS` positions,
    else the model's own), ``"model"`` (keep it), ``"eager"`` or ``"sdpa"``.
    """
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {choice!r}; valid: {ATTENTION_CHOICES}")
    if choice == "auto":
        return "eager" if device_type == "cpu" and positions < EAGER_MAX_POSITIONS else None
    return None if choice == "model" else choice


def _kernels(model: Any) -> tuple[str | None, dict[str, str | None]]:
    config = model.config
    subs = {name: getattr(getattr(config, name, None), "_attn_implementation", None)
            for name in getattr(config, "sub_configs", {})}  # fmt: skip
    return getattr(config, "_attn_implementation", None), subs


@contextmanager
def attention_kernel(model: Any, kernel: str | None) -> Iterator[str | None]:
    """Run the block with ``model``'s attention set to ``kernel`` (every sub-model: the
    vision tower and the language model of a vision-language model), then put back what
    each had. ``kernel=None`` changes nothing. Yields the kernel in use (``None``: unknown)."""
    top, subs = _kernels(model)
    if kernel is None or kernel == top and all(v in (None, kernel) for v in subs.values()):
        yield top
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"attention {kernel!r} needs PreTrainedModel.set_attn_implementation, which this "
                         "transformers lacks; pass attention='model' to keep the model's own kernel")  # fmt: skip
    model.set_attn_implementation(kernel)
    try:
        yield kernel
    finally:
        if top is not None:
            model.set_attn_implementation(top)
        known = {name: impl for name, impl in subs.items() if impl is not None}
        if known and any(impl != top for impl in known.values()):
            model.set_attn_implementation(known)

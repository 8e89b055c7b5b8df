"""Where a model runs and in what precision: ``--device`` and ``--dtype`` for every command.

``resolve_device("auto")`` picks CUDA when a GPU is visible, then Apple's MPS, then the CPU;
an explicit ``cuda``/``cuda:N``/``mps`` that this machine cannot offer is an error that says
what it can offer, not a silent fall-back to the CPU. ``resolve_dtype`` maps the three
names a user types to torch dtypes.

Whatever the model's dtype, icp_lens accumulates effects, means and bootstrap sums in
float32 (the scorers cast each batch's metric to float32 before summing), so a bfloat16
model changes the *model's* arithmetic, not the bookkeeping's. The agreement measured on
the organisms (``tests/test_devices.py``) is the bound we document: bfloat16 scores on CPU
keep the fp32 top-20 and stay within ``BF16_EFFECT_ATOL`` of the fp32 effects after
normalising by the largest.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported lazily: `icp-lens --help` should not wait for it
    import torch

__all__ = [
    "BF16_EFFECT_ATOL",
    "DEVICE_HELP",
    "DTYPE_NAMES",
    "add_device_arguments",
    "resolve_device",
    "resolve_dtype",
]

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DtypeName = Literal["float32", "bfloat16", "float16"]
DEVICE_HELP = "auto (CUDA if present, then MPS, else CPU), cpu, cuda, cuda:N or mps"
# max |bf16 effect - fp32 effect| / max |fp32 effect|: 0.0027 measured on the lexical organism
# (all 520 neuron/head features, exact, resample); tests/test_devices.py holds it to this bound
BF16_EFFECT_ATOL = 0.01


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; valid: {DEVICE_HELP}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {spec!r}: this machine has no CUDA GPU; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError(f"device {spec!r}: MPS is not available here; use --device cpu (or auto)")
    elif device.type != "cpu":
        raise ValueError(f"unknown device {spec!r}; valid: {DEVICE_HELP}")
    return device


def resolve_dtype(name: str | torch.dtype | None = "float32") -> torch.dtype:
    """The torch dtype for ``float32``, ``bfloat16`` or ``float16`` (``None``: float32)."""
    import torch

    if isinstance(name, torch.dtype):
        if str(name).removeprefix("torch.") not in DTYPE_NAMES:
            raise ValueError(f"dtype {name} is not supported; valid: {list(DTYPE_NAMES)}")
        return name
    key = "float32" if name is None else str(name).strip().lower().removeprefix("torch.")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(key, key)
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; valid: {list(DTYPE_NAMES)}")
    return getattr(torch, key)


def _device_arg(text: str) -> str:
    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_device_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """Add ``--device`` (default ``auto``) and, with ``dtype``, ``--dtype`` (default ``float32``)."""
    parser.add_argument("--device", type=_device_arg, default="auto", help=f"where the model runs: {DEVICE_HELP}")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                            help="the model's precision (sums are kept in float32 whatever it is)")  # fmt: skip

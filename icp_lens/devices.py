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

A model too large for one device is split by accelerate: ``--device-map auto`` (or
``balanced``, ``balanced_low_0``, ``sequential``, or a JSON file mapping module names to
devices, ``"disk"`` included) with ``--offload-folder DIR`` for layers kept on disk. The
blocks then live on several devices and accelerate moves the activations between them;
icp_lens puts its inputs where the token embedding runs (:func:`input_device`) and reads
hook activations wherever they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported lazily: `icp-lens --help` should not wait for it
    import torch

__all__ = [
    "BF16_EFFECT_ATOL",
    "DEVICE_HELP",
    "DTYPE_NAMES",
    "DEVICE_MAPS",
    "add_device_arguments",
    "fast_bfloat16",
    "input_device",
    "load_kwargs",
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


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively (fast) on ``device``.

    CUDA: the GPU supports bfloat16 (Ampere and later). CPU: oneDNN has bfloat16 kernels
    for it (AVX-512 or AMX). On a CPU with AVX2 only, bfloat16 autocast is emulated and a
    training step ran about 30x slower than in float32 (SmolLM2-135M, batch 8), so code
    that would use bfloat16 for speed should not there. MPS and others: ``False``.
    """
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


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


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s input ids go: the device its token embedding runs on.

    That is the first parameter's device, except under an accelerate ``device_map`` that
    offloaded it (a ``meta`` parameter): then the execution device of accelerate's hook.
    """
    import torch

    try:
        first = next(model.parameters())
    except StopIteration:
        return torch.device("cpu")
    if first.device.type != "meta":
        return first.device
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu")


def _device_map_arg(text: str) -> str | dict:
    if text in DEVICE_MAPS:
        return text
    import json

    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is neither one of {list(DEVICE_MAPS)} nor a JSON file")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text}: not JSON ({err})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise argparse.ArgumentTypeError(f"{text}: expected an object mapping module names to devices")
    return mapping


def load_kwargs(args: argparse.Namespace) -> dict:
    """``boot_bridge`` keywords for a command's ``--device``/``--device-map``/``--offload-folder``.

    With ``--device-map`` the model is split by accelerate and ``--device`` must stay
    ``auto``; without it, ``{"device": <resolved --device>}``.
    """
    device_map = getattr(args, "device_map", None)
    if device_map is None:
        if getattr(args, "offload_folder", None) is not None:
            raise ValueError("--offload-folder needs --device-map")
        return {"device": str(resolve_device(getattr(args, "device", "auto")))}
    if getattr(args, "device", "auto") != "auto":
        raise ValueError(f"choose --device {args.device} or --device-map, not both")
    kwargs: dict = {"device": None, "device_map": device_map}
    if getattr(args, "offload_folder", None) is not None:
        kwargs["offload_folder"] = str(args.offload_folder)
    return kwargs


def _device_arg(text: str) -> str:
    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_device_arguments(
    parser: argparse.ArgumentParser,
    *,
    dtype: bool = True,
    device_map: bool = False,
    default: str = "auto",
    device_help: str | None = None,
) -> None:
    """Add ``--device`` (default ``auto``), with ``dtype`` ``--dtype`` (default ``float32``) and
    with ``device_map`` ``--device-map`` / ``--offload-folder`` (a model split by accelerate).

    ``default`` and ``device_help`` replace ``--device``'s default and help text, for a command
    with a reason to stay on one device unless told (the built-in organisms: the CPU).
    """
    text = device_help if device_help is not None else f"where the model runs: {DEVICE_HELP}"
    parser.add_argument("--device", type=_device_arg, default=default, help=text)
    if device_map:
        split = (f"split the model over devices with accelerate: {'|'.join(DEVICE_MAPS)} or a JSON file "
                 "{module: device} ('disk' needs --offload-folder); not with --device")  # fmt: skip
        parser.add_argument("--device-map", type=_device_map_arg, default=None, help=split)
        parser.add_argument("--offload-folder", type=Path, default=None,
                            help="where accelerate keeps the layers a --device-map sends to 'disk'")  # fmt: skip
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                            help="the model's precision (sums are kept in float32 whatever it is)")  # fmt: skip

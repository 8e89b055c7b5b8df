"""A torch function mode that lists the tensors icp_lens creates without saying where.

``torch.zeros(3)`` lands on the default device (the CPU), whatever device the model is
on; on a GPU run that is a silent host tensor (a transfer per use, or a device-mismatch
error much later). :class:`ImplicitDeviceGuard` intercepts the tensor factories
(:data:`FACTORY_NAMES`) while it is active and records each call that passes no
``device`` (or ``device=None``) and whose caller -- the first Python frame outside
torch and this module -- belongs to the ``icp_lens`` package. Calls made by
transformers, TransformerLens or torch itself are not ours and are not recorded.

Deliberate CPU tensors (index tensors drawn with a CPU ``torch.Generator``, data built
on the CPU and moved once) say ``device="cpu"``; tensors that follow another tensor use
``*_like`` / ``Tensor.new_*``, which this mode does not intercept.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["FACTORY_NAMES", "ImplicitDeviceGuard", "ImplicitTensor"]

#: the torch functions that create a tensor from sizes or Python data (``*_like`` and
#: ``Tensor.new_*`` follow their input's device and are not listed)
FACTORY_NAMES = (
    "arange", "as_tensor", "empty", "empty_strided", "eye", "full", "linspace", "logspace", "ones", "rand",
    "randint", "randn", "randperm", "range", "scalar_tensor", "tensor", "tril_indices", "triu_indices", "zeros",
)  # fmt: skip
_FACTORIES = {getattr(torch, name): name for name in FACTORY_NAMES if hasattr(torch, name)}
#: with tensor data these copy or keep the data's device, so they need no ``device``
_FOLLOW_DATA = {"as_tensor", "tensor"}


@dataclass(frozen=True)
class ImplicitTensor:
    """One factory call without a device: which function, and where in icp_lens."""

    function: str
    module: str
    filename: str
    lineno: int
    caller: str
    trail: tuple[str, ...] = ()  # the package's frames further out, innermost first ("file:line")

    def __str__(self) -> str:
        via = f" via {' < '.join(self.trail)}" if self.trail else ""
        return f"{self.filename}:{self.lineno} in {self.caller}(): torch.{self.function} without device={via}"


def _module_of(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", ""))


def _is_torch(module: str) -> bool:
    return module == "torch" or module.startswith("torch.")


def _first_caller(start: FrameType | None) -> FrameType | None:
    """The first frame from ``start`` outwards that is neither torch's nor this module's."""
    frame = start
    while frame is not None and (_is_torch(_module_of(frame)) or _module_of(frame) == __name__):
        frame = frame.f_back
    return frame


class ImplicitDeviceGuard(TorchFunctionMode):
    """Record the device-less tensor factories called from ``package`` while active.

    ``with ImplicitDeviceGuard() as guard: ...`` then ``guard.found`` (one
    :class:`ImplicitTensor` per call; ``guard.report()`` lists them by file and line) and
    ``guard.seen``, how many factory calls the package made in all (with a device or not):
    a check that saw none was not looking.

    Torch function modes are per thread: factories called in another thread (the autograd
    engine's device threads on a GPU, a data loader's workers) are not seen.
    """

    def __init__(self, package: str = "icp_lens") -> None:
        super().__init__()
        self.package = package
        self.found: list[ImplicitTensor] = []
        self.seen = 0

    def _ours(self, module: str) -> bool:
        return module == self.package or module.startswith(self.package + ".")

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _FACTORIES.get(func)
        if name is not None and not (name in _FOLLOW_DATA and args and isinstance(args[0], torch.Tensor)):
            caller = _first_caller(sys._getframe(1))
            if caller is not None and self._ours(_module_of(caller)):
                self.seen += 1
                if kwargs.get("device") is None:
                    code = caller.f_code
                    self.found.append(ImplicitTensor(name, _module_of(caller), code.co_filename, caller.f_lineno,
                                                     code.co_name, self._trail(caller.f_back)))  # fmt: skip
        return func(*args, **kwargs)

    def _trail(self, frame: FrameType | None, depth: int = 3) -> tuple[str, ...]:
        """Up to ``depth`` further frames of the package outside ``frame`` (who called the offender)."""
        out: list[str] = []
        while frame is not None and len(out) < depth:
            if self._ours(_module_of(frame)):
                out.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            frame = frame.f_back
        return tuple(out)

    def assert_clean(self) -> None:
        """Fail unless the guard saw factory calls from icp_lens (it was active) and none without ``device=``."""
        assert self.seen > 0, "the guard saw no factory call from icp_lens: it was not active"
        assert not self.found, "tensors created without device= (they land on the CPU):\n" + self.report()

    def report(self) -> str:
        """Each distinct offender once, by file and line, with how often it was called."""
        counts: dict[str, int] = {}
        for hit in self.found:
            counts[str(hit)] = counts.get(str(hit), 0) + 1
        return "\n".join(f"{text}  (x{n})" for text, n in sorted(counts.items()))

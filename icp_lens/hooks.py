"""The only module that touches hook state.

Every icp_lens intervention, cache and gradient capture goes through ``hooked``, a context
manager that adds hook functions to named hook points on entry and removes exactly those
(and no others) on exit, in a ``try/finally``: an exception inside the block, or a
``KeyboardInterrupt`` in a notebook, leaves no hook behind, and nested contexts remove
only their own hooks. This guards against the classic TransformerLens failure where a
crashed ``run_with_hooks`` or ``model.hooks()`` leaves hooks that silently corrupt every
later forward pass.

Hooks are added through ``HookPoint.add_hook`` so that TransformerBridge's hook
conversions apply (for example ``blocks.L.attn.hook_z`` is reshaped to
``[batch, pos, n_heads, d_head]`` on the bridge), and are removed by their own handle,
which works on TransformerLens 3.x (``add_hook`` returns nothing) and 4.x alike.

A hook function takes ``(activation, hook)`` and returns a replacement activation or
``None`` (read only), exactly as in TransformerLens.

**Hook points a bridge lacks** (:data:`EXTRA_HOOK_POINTS`). TransformerLens's LLaVA bridge
hooks the projector's input and output only: its hidden neurons (``act(linear_1(x))``, the
input of ``linear_2``) have no hook point. ``hooked`` and ``capturing`` accept
``vision_projector.hook_hidden`` all the same: a plain PyTorch forward hook on the Hugging
Face module that computes those activations (the projector's ``act``) calls the hook
function as a hook point would (``fn(activation, hook)``, ``hook.name`` set; a returned
tensor replaces the output) and is removed with the block's other hooks. Forward hooks
only: a backward hook there is refused (gradients reach the activation through autograd,
as the attribution scorers take them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from icp_lens.model import HookedModel, resolve_hook_point

__all__ = ["HookFn", "hooked", "capturing", "active_hook_count", "module_hooks", "EXTRA_HOOK_POINTS", "extra_module"]

HookFn = Callable[..., "Tensor | None"]
Direction = Literal["fwd", "bwd"]


#: hook names a bridge lacks -> the paths (in the bridge's HF model, either LLaVA layout) of the module
#: whose forward output they carry
EXTRA_HOOK_POINTS: dict[str, tuple[str, ...]] = {
    "vision_projector.hook_hidden": ("model.multi_modal_projector.act", "multi_modal_projector.act"),
}


@dataclass(frozen=True)
class _ExtraHook:
    """What a hook function gets as ``hook`` at an extra hook point (its ``name``, as a ``HookPoint`` has)."""

    name: str


def extra_module(model: HookedModel, name: str) -> Any:
    """The HF module whose output the extra hook point ``name`` carries (``None`` when ``model`` has it as a
    real hook point or ``name`` is not an extra one); a bridge without that module raises."""
    if name not in EXTRA_HOOK_POINTS or name in model.hook_dict:
        return None
    hf = getattr(model, "original_model", None)
    for path in EXTRA_HOOK_POINTS[name] if hf is not None else ():
        try:
            return hf.get_submodule(path)
        except AttributeError:
            continue
    paths = " or ".join(EXTRA_HOOK_POINTS[name])
    raise ValueError(f"{name} is made from a LLaVA-style projector's act module ({paths} of the bridge's "
                     f"original_model), which {type(model).__name__} does not have")  # fmt: skip


def _add_extra(module: Any, name: str, fn: HookFn, direction: Direction) -> Any:
    """A PyTorch forward hook on ``module`` that calls ``fn(output, hook)``; returns its removable handle."""
    if direction != "fwd":
        raise ValueError(f"{name} takes forward hooks only (it is a PyTorch forward hook on the projector's act)")
    hook = _ExtraHook(name)
    return module.register_forward_hook(lambda _module, _args, output: fn(output, hook))


def _handles(point: Any, direction: Direction) -> list[Any]:
    return point.fwd_hooks if direction == "fwd" else point.bwd_hooks


def _add(model: HookedModel, name: str, fn: HookFn, direction: Direction) -> tuple[Any, Direction, Any]:
    point = resolve_hook_point(model, name)
    checker = getattr(model, "check_hooks_to_add", None)  # raises on hook points gated off
    if checker is not None:
        if "hook_point" in inspect.signature(checker).parameters:
            checker(point, name, fn, dir=direction)
        else:  # TransformerBridge in TransformerLens 3.x
            checker(name)
    before = {id(h) for h in _handles(point, direction)}
    returned = point.add_hook(fn, dir=direction)
    if returned is not None:
        return point, direction, returned
    new = [h for h in _handles(point, direction) if id(h) not in before]
    if len(new) != 1:  # pragma: no cover - would mean TransformerLens changed add_hook
        raise RuntimeError(f"Could not identify the hook handle added to {name!r}")
    return point, direction, new[0]


def _remove(point: Any, direction: Direction, handle: Any) -> None:
    handle.hook.remove()
    handles = _handles(point, direction)
    for i, h in enumerate(handles):
        if h is handle:
            del handles[i]
            break


@contextmanager
def hooked(
    model: HookedModel,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    bwd_hooks: Sequence[tuple[str, HookFn]] = (),
) -> Iterator[HookedModel]:
    """Add hooks for the duration of a ``with`` block; remove exactly these on exit.

    >>> with hooked(model, [("blocks.0.mlp.hook_post", lambda act, hook: act * 0)]):
    ...     logits = model(tokens)
    """
    removers: list[Callable[[], None]] = []
    try:
        for hooks, direction in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")):
            for name, fn in hooks:
                module = extra_module(model, name)
                if module is not None:
                    removers.append(_add_extra(module, name, fn, direction).remove)  # type: ignore[arg-type]
                    continue
                point, way, handle = _add(model, name, fn, direction)  # type: ignore[arg-type]
                removers.append(lambda point=point, way=way, handle=handle: _remove(point, way, handle))
        yield model
    finally:
        for remove in reversed(removers):
            remove()


@contextmanager
def capturing(
    model: HookedModel,
    names: Sequence[str],
    *,
    detach: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Record the activations at ``names`` during forward passes in the block.

    Yields a dict that is filled as the model runs (each forward overwrites it).
    """
    store: dict[str, Tensor] = {}

    def make(name: str) -> HookFn:
        def record(activation: Tensor, hook: Any) -> None:
            store[name] = activation.detach() if detach else activation

        return record

    with hooked(model, [(name, make(name)) for name in dict.fromkeys(names)]):
        yield store


@contextmanager
def module_hooks(
    pre: Sequence[tuple[Any, Callable[..., Any]]] = (),
    post: Sequence[tuple[Any, Callable[..., Any]]] = (),
    pre_kwargs: Sequence[tuple[Any, Callable[..., Any]]] = (),
) -> Iterator[None]:
    """Plain PyTorch hooks on ``torch.nn.Module`` objects, for models without hook points.

    ``pre`` pairs get ``register_forward_pre_hook`` (``fn(module, args) -> new args``),
    ``pre_kwargs`` pairs the same with keyword arguments (``fn(module, args, kwargs) ->
    (new args, new kwargs)``), ``post`` pairs ``register_forward_hook`` (``fn(module,
    args, output) -> new output``). The pruner uses them to ablate a Hugging Face model
    directly (e.g. BERT, which no hooked model wraps), the exact scorer to feed and stop
    blocks of a bridge's HF model. All are removed on exit, also after an exception.
    """
    handles: list[Any] = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn))
        for module, fn in pre_kwargs:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in post:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


def active_hook_count(model: HookedModel) -> int:
    """How many hook functions are attached to the model's hook points (for hygiene checks).

    Counts both TransformerLens's handle lists and PyTorch's own hook registries, so a
    handle that was dropped from one but not the other is still counted, and the forward
    hooks on the modules behind :data:`EXTRA_HOOK_POINTS` where the model has them.
    """
    points = {id(p): p for p in model.hook_dict.values()}.values()
    extra = 0
    for name in EXTRA_HOOK_POINTS:
        try:
            module = extra_module(model, name)
        except ValueError:
            continue
        extra += 0 if module is None else len(module._forward_hooks)
    return extra + sum(
        max(len(p.fwd_hooks), len(p._forward_hooks)) + max(len(p.bwd_hooks), len(p._backward_hooks)) for p in points
    )

"""Applying direction edits at run time, on a hooked model and on a plain HF model.

``x -> x - a (b . x - t)`` where the target ``t`` is 0 (``project``), the stored mean
(``mean``) or ``b . x'`` on the counterfactual run (``resample``). A ``resid_pre``
direction is applied at every hook that writes into the residual stream
(:func:`residual_writers`), a module or head direction at its own hook. Several
directions at one hook are applied in the set's order (the weight fold composes them in
the same order, so the exported checkpoint computes exactly this). Arithmetic runs in
fp32 or wider whatever the model's dtype, and the result is cast back.

- :func:`direction_hooks` / :func:`applying_directions`: TransformerLens hooks
  (``TransformerBridge`` or ``HookedTransformer``), inside a context manager;
- :func:`hf_writer_modules` / :func:`hf_directions`: the same edit through PyTorch module
  hooks on the Hugging Face model (what verifies the exported checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from icp_lens.directions.core import DIRECTION_MODES, Direction, DirectionSet
from icp_lens.features import parse_site
from icp_lens.hooks import hooked, module_hooks

__all__ = [
    "residual_writers",
    "edit_points",
    "writers_before",
    "direction_hooks",
    "applying_directions",
    "hf_writer_modules",
    "hf_directions",
    "edit_tensor",
]


def residual_writers(model: Any) -> tuple[str, ...]:
    """Hook names of everything that writes into a hooked model's residual stream, in order."""
    names = ["hook_embed"]
    if "hook_pos_embed" in model.hook_dict and getattr(model.cfg, "positional_embedding_type", "") == "standard":
        names.append("hook_pos_embed")
    for layer in range(int(model.cfg.n_layers)):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return tuple(names)


def writers_before(writers: Sequence[str], layer: int) -> tuple[str, ...]:
    """The residual writers whose sum is ``blocks.<layer>.hook_resid_pre``: embeddings and earlier blocks."""
    return tuple(w for w in writers if not w.startswith("blocks.") or int(w.split(".")[1]) < layer)


def edit_points(direction: Direction, writers: Sequence[str]) -> tuple[str, ...]:
    """The hook names where ``direction`` is applied (its means follow this order).

    A ``resid_pre`` direction of layer ``L`` is applied to every writer *before* ``L``
    (the embeddings and blocks ``0..L-1``): then ``resid_pre`` of ``L`` is exactly the
    run-time projection of the clean stream there, every earlier layer reads the edited
    stream, and layers from ``L`` on may write the direction again (the answer itself is
    often written along it; removing it from every later writer can erase the output).
    """
    name, head = parse_site(direction.site)
    layer = direction.feature.layer
    if name == "resid_pre":
        return writers_before(writers, layer)
    if name == "z":
        return (f"blocks.{layer}.attn.hook_z",)
    return (f"blocks.{layer}.hook_{name}",)


def edit_tensor(x: Tensor, direction: Direction, target: Tensor | float) -> Tensor:
    """``x - a (b . x - target)`` on the last axis, computed in fp32 or wider, returned in x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    a = direction.write.to(device=x.device, dtype=dtype)
    b = direction.read.to(device=x.device, dtype=dtype)
    amount = xf @ b
    if isinstance(target, Tensor):
        target = target.to(device=x.device, dtype=dtype)
    return (xf - (amount - target)[..., None] * a).to(x.dtype)


Targets = Mapping[tuple[int, str], Tensor]  # (direction number, hook name) -> b.x' on the counterfactual


def _plan(directions: DirectionSet, writers: Sequence[str]) -> dict[str, list[tuple[int, Direction, int]]]:
    by_hook: dict[str, list[tuple[int, Direction, int]]] = {}
    for i, d in enumerate(directions):
        for j, hook in enumerate(edit_points(d, writers)):
            by_hook.setdefault(hook, []).append((i, d, j))
    return by_hook


def direction_hooks(
    model: Any,
    directions: DirectionSet,
    *,
    mode: str = "mean",
    targets: Targets | None = None,
) -> list[tuple[str, Callable[..., Tensor]]]:
    """Forward hooks that apply ``directions`` in ``mode`` (``resample`` needs ``targets``)."""
    if mode not in DIRECTION_MODES:
        raise ValueError(f"Unknown direction mode {mode!r}; valid: {list(DIRECTION_MODES)}")
    if mode == "resample" and targets is None:
        raise ValueError("resample needs the counterfactual's amounts (targets=...)")
    writers = directions.writers or residual_writers(model)
    hooks = []
    for hook, items in _plan(directions, writers).items():

        def fn(
            act: Tensor, hook: Any = None, items: list[tuple[int, Direction, int]] = items, name: str = hook
        ) -> Tensor:
            for i, d, j in items:
                target: Tensor | float
                if mode == "project":
                    target = 0.0
                elif mode == "mean":
                    target = float(d.means[j])
                else:
                    target = targets[(i, name)]  # type: ignore[index]
                head = d.head
                if head is None:
                    act = edit_tensor(act, d, target)
                else:
                    act = act.clone()
                    act[..., head, :] = edit_tensor(act[..., head, :], d, target)
            return act

        hooks.append((hook, fn))
    return hooks


@contextmanager
def applying_directions(
    model: Any, directions: DirectionSet, *, mode: str = "mean", targets: Targets | None = None
) -> Iterator[Any]:
    """``with applying_directions(bridge, dirs): bridge(tokens)`` runs the edited model."""
    with hooked(model, direction_hooks(model, directions, mode=mode, targets=targets)):
        yield model


def amounts(model: Any, directions: DirectionSet, tokens: Tensor) -> dict[tuple[int, str], Tensor]:
    """``b . x`` at every edit point of every direction on ``tokens`` (the resample targets)."""
    writers = directions.writers or residual_writers(model)
    plan = _plan(directions, writers)
    out: dict[tuple[int, str], Tensor] = {}

    def make(name: str, items: list[tuple[int, Direction, int]]):
        def fn(act: Tensor, hook: Any = None) -> None:
            for i, d, _ in items:
                x = act if d.head is None else act[..., d.head, :]
                out[(i, name)] = d.amount(x).detach()

        return fn

    with torch.no_grad(), hooked(model, [(h, make(h, items)) for h, items in plan.items()]):
        model(tokens)
    return out


# -- plain Hugging Face models ---------------------------------------------------------
def hf_writer_modules(model: nn.Module, writers: Sequence[str]) -> dict[str, nn.Module]:
    """The HF modules whose outputs are the hooked model's residual ``writers``."""
    from icp_lens.pruning.arch import _get, arch_spec, layer_module

    spec = arch_spec(model)
    out: dict[str, nn.Module] = {}
    for name in writers:
        if name == "hook_embed":
            out[name] = model.get_input_embeddings()
        elif name == "hook_pos_embed":
            out[name] = model.transformer.wpe
        else:
            _, layer, hook = name.split(".")
            path = spec.attn_out if hook == "hook_attn_out" else spec.mlp_out
            out[name] = _get(layer_module(model, int(layer)), path)
    return out


def _hf_module(model: nn.Module, hook: str) -> tuple[nn.Module, bool]:
    """The HF module for a hook name; ``True`` when the edit is on its *input* (head outputs z)."""
    from icp_lens.pruning.arch import _get, arch_spec, layer_module

    if hook.endswith("attn.hook_z"):
        layer = int(hook.split(".")[1])
        return _get(layer_module(model, layer), arch_spec(model).attn_out), True
    return hf_writer_modules(model, [hook])[hook], False


@contextmanager
def hf_directions(model: nn.Module, directions: DirectionSet, *, mode: str = "mean") -> Iterator[nn.Module]:
    """Apply ``directions`` to an HF model with module hooks (``project`` or ``mean``)."""
    if mode not in ("project", "mean"):
        raise ValueError(f"An HF model takes direction mode 'project' or 'mean', not {mode!r}")
    from icp_lens.pruning.arch import head_dim

    if not directions.writers and any(d.site == "resid_pre" for d in directions):
        raise ValueError("This direction set records no residual writers; fit it on a hooked model")
    pre, post = [], []
    for hook, items in _plan(directions, directions.writers).items():
        module, on_input = _hf_module(model, hook)

        def edit(x: Tensor, items: list[tuple[int, Direction, int]] = items, on_input: bool = on_input) -> Tensor:
            for _, d, j in items:
                target = 0.0 if mode == "project" else float(d.means[j])
                if on_input:
                    width = head_dim(model)
                    sl = slice(d.head * width, (d.head + 1) * width)
                    x = x.clone()
                    x[..., sl] = edit_tensor(x[..., sl], d, target)
                else:
                    x = edit_tensor(x, d, target)
            return x

        if on_input:
            pre.append((module, lambda m, args, edit=edit: (edit(args[0]), *args[1:])))
        else:
            post.append((module, lambda m, args, output, edit=edit: edit(output)))
    with module_hooks(pre=pre, post=post):
        yield model

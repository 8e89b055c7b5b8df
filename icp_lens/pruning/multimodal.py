"""Pruning MLP neurons and attention heads of both towers of a LLaVA-style model, exported as an ordinary checkpoint.

A neuron ``j`` of an MLP is input ``j`` of its output projection (the hook point
``...mlp.hook_post[..., j]`` on the bridge); a head ``h`` is inputs ``h*d .. (h+1)*d - 1``
of its attention's output projection (``...attn.hook_z[..., h, :]``, ``d = d_head``). So

- *zero* ablation is zeroing those columns of that projection;
- *mean* ablation (the unit fixed at a constant ``m``, e.g. its mean over probe images)
  is that plus ``bias += W[:, cols] @ m``, which needs a bias: the CLIP vision tower's
  ``fc2`` and ``out_proj`` have one, and so has the projector's ``linear_2`` (whose inputs
  are the projector's hidden neurons), the Llama language model's ``down_proj`` and
  ``o_proj`` do not (mean mode is refused there with the reason; zero mode works).

Units are named by the bridge's hook points, as
:func:`icp_lens.scoring.image_scores.score_image_units` reports them:
``vision_encoder.encoder_layers.L.mlp.hook_post`` / ``...attn.hook_z`` (vision tower) and
``vision_projector.hook_hidden`` (the projector's hidden neurons, a hook point
:mod:`icp_lens.hooks` adds) and ``blocks.L.mlp.hook_post`` / ``blocks.L.attn.hook_z``
(language model). :func:`export_pruned_llava` edits a copy,
writes it with its processor all at once, reloads it with ``transformers`` alone and
checks its logits against the same ablation done at run time with hooks on the bridge.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = [
    "LlavaPruneReport", "MEAN_FOLDABLE_PREFIXES",
    "llava_mlp_out", "llava_out_proj", "unit_columns", "prune_llava_neurons",
    "prune_llava_units", "export_pruned_llava", "compare_with_bridge",
]  # fmt: skip

_V, _T = r"vision_encoder\.encoder_layers\.(\d+)\.", r"blocks\.(\d+)\."
#: hook pattern -> the HF module paths of the projection its units feed (both LLaVA layouts)
_PATHS = {
    re.compile(_V + r"mlp\.hook_post"): ("model.vision_tower.encoder.layers.{}.mlp.fc2",
                                        "model.vision_tower.vision_model.encoder.layers.{}.mlp.fc2"),
    re.compile(_V + r"attn\.hook_z"): ("model.vision_tower.encoder.layers.{}.self_attn.out_proj",
                                      "model.vision_tower.vision_model.encoder.layers.{}.self_attn.out_proj"),
    re.compile(_T + r"mlp\.hook_post"): ("model.language_model.layers.{}.mlp.down_proj",
                                        "model.language_model.model.layers.{}.mlp.down_proj"),
    re.compile(_T + r"attn\.hook_z"): ("model.language_model.layers.{}.self_attn.o_proj",
                                      "model.language_model.model.layers.{}.self_attn.o_proj"),
    re.compile(r"vision_projector\.hook_hidden"): ("model.multi_modal_projector.linear_2",
                                                  "multi_modal_projector.linear_2"),
}  # fmt: skip
PRUNABLE_HOOKS = ("vision_encoder.encoder_layers.L.mlp.hook_post", "vision_encoder.encoder_layers.L.attn.hook_z",
                  "vision_projector.hook_hidden", "blocks.L.mlp.hook_post", "blocks.L.attn.hook_z")  # fmt: skip
#: hook points whose output projection has a bias (the vision tower's fc2 / out_proj, the projector's linear_2):
#: mean ablation folds into that bias; the language model's units have none
MEAN_FOLDABLE_PREFIXES = ("vision_encoder.", "vision_projector.")


def llava_out_proj(model: nn.Module, hook_name: str) -> nn.Linear:
    """The output projection whose inputs are the units (neurons or heads' z) at ``hook_name`` (HF LLaVA model)."""
    for pattern, templates in _PATHS.items():
        match = pattern.fullmatch(hook_name)
        if match is None:
            continue
        for template in templates:
            try:
                return model.get_submodule(template.format(*match.groups()))
            except AttributeError:
                continue
        where = f"no layer {match.group(1)}" if match.groups() else "no LLaVA-style projector"
        raise ValueError(f"{hook_name}: {where} in this model")
    raise ValueError(f"cannot prune units of {hook_name!r}; prunable hook points: {', '.join(PRUNABLE_HOOKS)}")


def llava_mlp_out(model: nn.Module, hook_name: str) -> nn.Linear:
    """The output projection whose inputs are the neurons at ``hook_name`` (:func:`llava_out_proj` for MLPs)."""
    if not hook_name.endswith("mlp.hook_post"):
        raise ValueError(f"{hook_name} is not an MLP's neurons (...mlp.hook_post); see llava_out_proj")
    return llava_out_proj(model, hook_name)


def unit_columns(model: nn.Module, hook_name: str, units: Sequence[int]) -> list[int]:
    """The input columns of ``hook_name``'s output projection that ``units`` occupy (a head: ``d_head`` of them)."""
    out = llava_out_proj(model, hook_name)
    if not hook_name.endswith("attn.hook_z"):
        return [int(u) for u in units]
    config = model.config.vision_config if hook_name.startswith("vision_encoder.") else model.config.text_config
    n_heads = config.num_attention_heads
    d_head = out.weight.shape[1] // n_heads
    bad = [u for u in units if not 0 <= int(u) < n_heads]
    if bad:
        raise ValueError(f"{hook_name}: heads must be in [0, {n_heads}), got {list(units)}")
    return [int(u) * d_head + i for u in units for i in range(d_head)]


def prune_llava_units(
    model: nn.Module,
    units: Mapping[str, Sequence[int]],
    *,
    means: Mapping[str, Tensor] | None = None,
) -> int:
    """Zero- (or, with ``means``, mean-) ablate ``units`` (neurons or heads) in ``model``'s weights, in place.

    Returns the number of weights changed. ``means[hook]`` is the constant each unit of
    that hook point is fixed at (position-independent): ``[d_mlp]`` for neurons, ``[n_heads,
    d_head]`` for heads; hooks missing from ``means`` are zero-ablated.
    """
    changed = 0
    with torch.no_grad():
        for hook_name, indices in units.items():
            out = llava_out_proj(model, hook_name)
            cols = unit_columns(model, hook_name, list(indices))
            idx = torch.as_tensor(cols, dtype=torch.long, device=out.weight.device)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= out.weight.shape[1]):
                raise ValueError(f"{hook_name}: units must be in [0, {out.weight.shape[1]}), got {list(indices)}")
            if means is not None and hook_name in means:
                if out.bias is None:
                    raise ValueError(
                        f"{hook_name}: mean ablation folds W[:, cols] @ m into the output bias, and this projection "
                        "has none (Llama's down_proj / o_proj); use zero ablation for it (leave it out of means)"
                    )
                m = means[hook_name].to(out.weight.device, torch.float32).reshape(-1)[idx]
                out.bias.add_((out.weight[:, idx].float() @ m).to(out.bias.dtype))
                changed += out.bias.numel()
            changed += int((out.weight[:, idx] != 0).sum())
            out.weight[:, idx] = 0
    return changed


def prune_llava_neurons(
    model: nn.Module,
    units: Mapping[str, Sequence[int]],
    *,
    means: Mapping[str, Float[Tensor, " d_mlp"]] | None = None,
) -> int:
    """:func:`prune_llava_units` (kept for neuron-only callers: the same edit)."""
    return prune_llava_units(model, units, means=means)


@dataclass(frozen=True)
class LlavaPruneReport:
    """What :func:`export_pruned_llava` wrote and how well it matches the run-time ablation."""

    out: str
    units: dict[str, list[int]]
    mean_ablated: list[str]
    changed_weights: int
    max_abs_logit_diff: float
    passed: bool


def export_pruned_llava(
    source: str | Path,
    units: Mapping[str, Sequence[int]],
    out: str | Path,
    *,
    means: Mapping[str, Tensor] | None = None,
    verify_ids: Int[Tensor, " pos"] | None = None,
    verify_pixels: Float[Tensor, "n 3 h w"] | None = None,
    tolerance: float = 1e-4,
    plan: Mapping[str, Any] | None = None,
) -> LlavaPruneReport:
    """Prune ``units`` of the checkpoint at ``source`` into ``out`` (model and processor) and verify it.

    With ``verify_ids`` and ``verify_pixels``, the reloaded checkpoint's logits are compared
    with the source model run through a ``TransformerBridge`` whose hooks set the same
    neurons to zero (or their mean): ``passed`` when the largest difference is at most
    ``tolerance``. ``plan`` (a JSON-able record of the choice) is written into ``out`` as
    ``plan.json`` with the same all-or-nothing write, completed with ``units``,
    ``mean_ablated`` and ``changed_weights``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from icp_lens.atomic import atomic_directory
    from icp_lens.hooks import hooked

    model = AutoModelForImageTextToText.from_pretrained(str(source)).eval()
    edited = copy.deepcopy(model)
    changed = prune_llava_units(edited, units, means=means)
    with atomic_directory(out) as tmp:
        edited.save_pretrained(str(tmp))
        AutoProcessor.from_pretrained(str(source)).save_pretrained(str(tmp))
        if plan is not None:
            record = {**plan, "units": {k: [int(i) for i in v] for k, v in units.items()},
                      "mean_ablated": sorted(set(means or {}) & set(units)), "changed_weights": changed}  # fmt: skip
            (Path(tmp) / "plan.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    error = 0.0
    if verify_ids is not None and verify_pixels is not None:

        def ablate(name: str, idx: list[int]):
            head = name.endswith("attn.hook_z")  # [n, pos, heads, d_head]: a unit is one head's vector

            def fn(act: Tensor, hook: Any) -> Tensor:
                act = act.clone()
                value = 0.0 if means is None or name not in means else means[name][idx].to(act.dtype)
                if head:
                    act[..., idx, :] = value
                else:
                    act[..., idx] = value
                return act

            return fn

        hooks = [(name, ablate(name, list(idx))) for name, idx in units.items()]
        error = compare_with_bridge(source, out, verify_ids, verify_pixels, lambda bridge: hooked(bridge, hooks))
    return LlavaPruneReport(
        out=str(out), units={k: [int(i) for i in v] for k, v in units.items()},
        mean_ablated=sorted(set(means or {}) & set(units)), changed_weights=changed,
        max_abs_logit_diff=error, passed=error <= tolerance,
    )  # fmt: skip


def compare_with_bridge(
    source: str | Path,
    out: str | Path,
    ids: Int[Tensor, " pos"],
    pixels: Float[Tensor, "n 3 h w"],
    edit: Callable[[Any], AbstractContextManager[Any]],
) -> float:
    """Max |logit diff| between the checkpoint written to ``out`` (reloaded with ``transformers`` alone) and the
    source checkpoint on a ``TransformerBridge`` inside ``edit(bridge)`` (the same edit done at run time)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    bridge = TransformerBridge.boot_transformers(str(source), device="cpu")
    bridge.eval()
    ids = ids.expand(pixels.shape[0], -1)
    with torch.no_grad():
        with edit(bridge):
            expected = bridge(ids, pixel_values=pixels)
        got = reloaded(input_ids=ids, pixel_values=pixels).logits
    return float((got - expected).abs().max())

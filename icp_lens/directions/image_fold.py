"""Writing a fitted image-direction edit into a LLaVA-style checkpoint (the weights, not a hook).

The mean-mode edit ``h <- h - V^T (V h - m)`` of :mod:`icp_lens.directions.image` folds into
the module that writes ``h``: the projector's last linear layer, a vision layer's
``out_proj`` / ``fc2`` (``W <- (I - P) W``, ``b <- (I - P) b + V^T m``), or the vision
embeddings (patch convolution, class and position embeddings), with ``P = V^T V``.
:func:`export_image_directions` writes the edited checkpoint all at once and checks it
against the same edit as a hook on the bridge. Importable from ``icp_lens.directions.image``
as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from icp_lens.directions.image import (
    _VISION_OUT,
    IMAGE_DIRECTION_SITES,
    PROJECTOR_HOOK,
    VISION_EMBED_HOOK,
    ImageDirections,
    applying_image_directions,
)

__all__ = ["projector_linear", "vision_embeddings", "fold_image_directions", "ImageDirectionExport",
           "export_image_directions"]  # fmt: skip


def projector_linear(model: nn.Module) -> nn.Linear:
    """The projector's last linear layer (``linear_2``) of an HF LLaVA model (either module layout)."""
    for path in ("model.multi_modal_projector.linear_2", "multi_modal_projector.linear_2"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return module
    raise ValueError(f"{type(model).__name__} has no multi_modal_projector.linear_2: image directions fold into "
                     "a LLaVA-style projector")  # fmt: skip


def vision_embeddings(model: nn.Module) -> nn.Module:
    """The vision tower's embeddings module (CLIP-style: ``patch_embedding``, ``class_embedding``,
    ``position_embedding``) of an HF LLaVA model (either module layout)."""
    for path in ("model.vision_tower.embeddings", "vision_tower.embeddings",
                 "model.vision_tower.vision_model.embeddings", "vision_tower.vision_model.embeddings"):  # fmt: skip
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if all(hasattr(module, name) for name in ("patch_embedding", "class_embedding", "position_embedding")):
            return module
    raise ValueError(f"{type(model).__name__} has no CLIP-style vision embeddings (patch_embedding, class_embedding, "
                     "position_embedding): vision_embed directions fold into those")  # fmt: skip


def _writing_linear(model: nn.Module, hook_name: str) -> nn.Linear:
    """The linear layer whose output is ``hook_name``: the projector's ``linear_2``, or a vision layer's
    ``out_proj`` (``hook_attn_out``) or ``fc2`` (``hook_mlp_out``)."""
    if hook_name == PROJECTOR_HOOK:
        return projector_linear(model)
    match = _VISION_OUT.fullmatch(hook_name)
    if match is None:
        sites = [IMAGE_DIRECTION_SITES[s].format(layer="L") for s in IMAGE_DIRECTION_SITES]
        raise ValueError(f"image directions fold at {sites}, got {hook_name}")
    from icp_lens.pruning.multimodal import llava_out_proj

    unit = "attn.hook_z" if match.group(2) == "attn" else "mlp.hook_post"  # the units that projection reads
    return llava_out_proj(model, f"vision_encoder.encoder_layers.{match.group(1)}.{unit}")


@torch.no_grad()
def fold_image_directions(model: nn.Module, directions: ImageDirections) -> nn.Module:
    """Fold the mean-mode edit into the HF ``model``, in place; returns the edited module.

    At the projector's output (:data:`PROJECTOR_HOOK`) into its last linear layer, and at a
    vision layer's attention or MLP output into its ``out_proj`` or ``fc2``:
    ``W <- (I - V^T V) W``, ``b <- (I - V^T V) b + V^T m``; the layer must have a bias (LLaVA's
    and CLIP's have). At the vision embeddings (:data:`VISION_EMBED_HOOK`) into the patch convolution, the
    class embedding and the position embeddings (see the module doc). Computed in float64,
    stored in each weight's dtype.
    """
    embed = directions.hook_name == VISION_EMBED_HOOK
    module = vision_embeddings(model) if embed else _writing_linear(model, directions.hook_name)
    weight = module.patch_embedding.weight if embed else module.weight
    v = directions.vectors.double().to(weight.device)
    mean = v.T @ directions.means.double().to(v.device)
    keep = torch.eye(v.shape[1], dtype=torch.float64, device=v.device) - v.T @ v

    def put(param: Tensor, value: Tensor) -> None:
        param.copy_(value.to(param.dtype))

    if embed:
        conv = module.patch_embedding
        put(conv.weight, torch.einsum("de,e...->d...", keep, conv.weight.double()))
        if conv.bias is not None:
            put(conv.bias, keep @ conv.bias.double())
        put(module.class_embedding, keep @ module.class_embedding.double())
        pos = module.position_embedding.weight
        put(pos, pos.double() @ keep.T + mean)
        return module
    if module.bias is None:
        raise ValueError(f"the linear layer that writes {directions.hook_name} has no bias; the mean cannot be folded")
    put(module.weight, keep @ module.weight.double())
    put(module.bias, keep @ module.bias.double() + mean)
    return module


@dataclass(frozen=True)
class ImageDirectionExport:
    """What :func:`export_image_directions` wrote and how the reloaded checkpoint compared."""

    out: str
    rank: int
    digest: str
    changed_weights: int
    max_abs_logit_diff: float
    passed: bool


def export_image_directions(
    source: str | Path,
    directions: ImageDirections,
    out: str | Path,
    *,
    verify_ids: Tensor | None = None,
    verify_pixels: Tensor | None = None,
    tolerance: float = 1e-4,
    plan: dict[str, Any] | None = None,
) -> ImageDirectionExport:
    """Fold ``directions`` into a copy of the checkpoint at ``source`` and write it to ``out`` all at once.

    ``out`` gets the model, the processor and, with ``plan``, a ``plan.json`` completed with
    the directions' digest. With ``verify_ids`` and ``verify_pixels`` the reloaded checkpoint's
    logits are compared with the source run through a ``TransformerBridge`` with the edit as
    a hook (:func:`applying_image_directions`): ``passed`` when they agree to ``tolerance``.
    """
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from icp_lens.atomic import atomic_directory
    from icp_lens.pruning.multimodal import compare_with_bridge

    model = AutoModelForImageTextToText.from_pretrained(str(source)).eval()
    module = fold_image_directions(model, directions)
    changed = sum(p.numel() for p in module.parameters())
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp))
        AutoProcessor.from_pretrained(str(source)).save_pretrained(str(tmp))
        if plan is not None:
            record = {**plan, "image_directions": {"hook_name": directions.hook_name, "rank": directions.rank,
                                                   "source": directions.source, "digest": directions.digest()},
                      "changed_weights": changed}  # fmt: skip
            (Path(tmp) / "plan.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    error = 0.0
    if verify_ids is not None and verify_pixels is not None:
        error = compare_with_bridge(source, out, verify_ids, verify_pixels,
                                    lambda bridge: applying_image_directions(bridge, directions))  # fmt: skip
    return ImageDirectionExport(str(out), directions.rank, directions.digest(), changed, error, error <= tolerance)

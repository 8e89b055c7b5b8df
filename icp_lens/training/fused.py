"""Keeping a fused query/key/value weight in step with the bridge's split copies.

For architectures with one fused qkv projection (GPT-2 ``c_attn``, GPT-NeoX
``query_key_value``) ``TransformerBridge`` splits the fused weight into separate q, k and
v parameters at boot and runs those. For GPT-2 the split parameters are views of the
fused weight, so training them trains the checkpoint's weight in place. For GPT-NeoX
(per-head interleaved layout) they are *copies*: the trained values live only in the
copies and the fused weight that an export writes would be stale.

:func:`fused_qkv_sites` finds such copies and works out, once, where every entry of
each copy comes from in the fused weight (by running the bridge's own split on a weight
filled with its flat indices), checking the map against the current values;
:func:`sync_fused_qkv` writes the trained copies back into the fused weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FusedSite", "fused_qkv_sites", "sync_fused_qkv"]


@dataclass(frozen=True)
class FusedSite:
    """A fused projection and, per split copy, the flat fused indices of its weight (and bias)."""

    fused: nn.Module
    parts: tuple[tuple[nn.Module, Tensor, Tensor | None], ...]


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _index_like(t: Tensor) -> Tensor:
    """Each entry's flat index, on ``t``'s device (it replaces ``t`` as a parameter's data, which must stay there)."""
    return torch.arange(t.numel(), dtype=torch.float64, device=t.device).view(t.shape)


@torch.no_grad()
def fused_qkv_sites(bridge: Any) -> list[FusedSite]:
    """The fused qkv projections of ``bridge`` whose split q/k/v parameters are copies."""
    try:
        from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
            JointQKVAttentionBridge,
        )
    except ImportError:  # pragma: no cover - TransformerLens without the bridge
        return []
    sites = []
    for block in getattr(bridge, "blocks", []):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, JointQKVAttentionBridge):
            continue
        fused = attn.qkv.original_component
        parts = [attn.q.original_component, attn.k.original_component, attn.v.original_component]
        shared = all(_shares_storage(p.weight, fused.weight) for p in parts)
        if fused.bias is not None:
            shared = shared and all(p.bias is not None and _shares_storage(p.bias, fused.bias) for p in parts)
        if shared:
            continue
        weight, bias = fused.weight.data, None if fused.bias is None else fused.bias.data
        try:
            fused.weight.data = _index_like(weight)
            if bias is not None:
                fused.bias.data = _index_like(bias)
            index_parts = attn.split_qkv_matrix(attn.original_component)
        finally:
            fused.weight.data = weight
            if bias is not None:
                fused.bias.data = bias
        entries = []
        for part, index in zip(parts, index_parts, strict=True):
            w_idx = index.weight.detach().round().long()
            b_idx = None if index.bias is None or part.bias is None else index.bias.detach().round().long()
            if not torch.equal(weight.reshape(-1)[w_idx], part.weight.data):
                raise RuntimeError("Could not map the bridge's split q/k/v weights back onto the fused weight")
            entries.append((part, w_idx, b_idx))
        sites.append(FusedSite(fused=fused, parts=tuple(entries)))
    return sites


@torch.no_grad()
def sync_fused_qkv(sites: list[FusedSite]) -> None:
    """Write the (trained) split q/k/v copies back into their fused weights."""
    for site in sites:
        weight = site.fused.weight
        flat_w = weight.data.reshape(-1).clone()
        flat_b = None if site.fused.bias is None else site.fused.bias.data.reshape(-1).clone()
        for part, w_idx, b_idx in site.parts:
            flat_w[w_idx.reshape(-1)] = part.weight.data.reshape(-1).to(flat_w.dtype)
            if b_idx is not None and flat_b is not None:
                flat_b[b_idx.reshape(-1)] = part.bias.data.reshape(-1).to(flat_b.dtype)
        weight.data.copy_(flat_w.view(weight.shape))
        if flat_b is not None:
            site.fused.bias.data.copy_(flat_b.view(site.fused.bias.shape))

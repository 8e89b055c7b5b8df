"""Where each feature lives in a Hugging Face model, per architecture.

A feature's *outgoing weights* are what pruning edits. The hook points icp_lens scores
(see ``icp_lens.features``) sit exactly at the input of a linear map:

- ``neuron`` ``blocks.L.mlp.hook_post[..., i]`` is input ``i`` of the MLP output
  projection (GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``, NeoX
  ``mlp.dense_4h_to_h``, BERT ``output.dense``);
- ``head`` ``blocks.L.attn.hook_z[..., h, :]`` is the ``d_head`` block of inputs
  ``h*d_head .. (h+1)*d_head`` of the attention output projection (``attn.c_proj``,
  ``self_attn.o_proj``, ``attention.dense``, ``attention.output.dense``);
- ``value`` ``blocks.L.attn.hook_v[..., h, :]`` is the ``d_head`` block of *outputs* of
  the value projection (a slice of GPT-2's fused ``c_attn``, of NeoX's interleaved
  ``query_key_value``, or of Llama's ``v_proj``; with grouped-query attention ``h`` is
  a key/value head, shared by its group of query heads).

So zero-ablating a neuron or head equals zeroing its columns of the output
projection (rows for GPT-2's ``Conv1D``, which stores weights transposed), and
mean-ablating it equals that plus folding ``mean @ W_slice`` into the output bias.
For a value feature the slice is of outputs: zero its weights and bias (zero mode), or
zero its weights and set its bias to the mean (mean mode). Residual-stream
dimensions are not prunable: a dimension of ``hook_resid_pre`` is the sum of every
earlier writer, and no weight edit sets it at one layer only. Query and key features
are not pruned either: they only move where a head attends (a zeroed key makes its head
attend to every position alike rather than removing the head), so pruning the head itself
(``head``) or its value (``value``) is the edit that removes what it carries.

An architecture without the needed bias (Llama's ``down_proj``/``o_proj`` by default)
gets it through its config flag (``mlp_bias``, ``attention_bias``) with every newly
created bias zero, so the function is unchanged apart from the fold; an architecture
without such a flag (Mistral, Qwen2 output projections) refuses mean mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["ArchSpec", "ARCHS", "arch_spec", "head_dim", "Site", "site_of", "PRUNABLE_KINDS", "unprunable_reason"]

PRUNABLE_KINDS: tuple[str, ...] = ("neuron", "head", "value")
_UNPRUNABLE: dict[str, str] = {
    "resid": "A residual-stream dimension is the sum of every earlier writer, so no weight edit removes it at "
    "one layer only.",
    "query": "A query or key only moves where its head attends (zeroing it makes the head attend uniformly, it "
    "does not remove the head); prune the head ('head') or its value ('value') instead.",
}
_UNPRUNABLE["key"] = _UNPRUNABLE["query"]


def unprunable_reason(kinds: list[str], what: str) -> str:
    """The error message for pruning features of ``kinds`` (``what`` names them): the prunable kinds and why."""
    reasons = dict.fromkeys(_UNPRUNABLE[k] for k in kinds if k in _UNPRUNABLE)
    return " ".join([f"Cannot prune {what}; prunable kinds: {list(PRUNABLE_KINDS)}.", *reasons])


ValueLayout = Literal["gpt2_fused", "neox_fused", "separate"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (relative to ``model.base_model``'s layers) of one architecture family."""

    layers: str
    mlp_out: str
    attn_out: str
    value: str
    value_layout: ValueLayout
    conv1d: bool = False
    mlp_bias_flag: str | None = None  # config flag that gives mlp_out a bias, if it may lack one
    attn_bias_flag: str | None = None  # same for attn_out and the value projection


_LLAMA = ArchSpec(
    layers="layers",
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    value="self_attn.v_proj",
    value_layout="separate",
    mlp_bias_flag="mlp_bias",
    attn_bias_flag="attention_bias",
)
ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="h",
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        value="attn.c_attn",
        value_layout="gpt2_fused",
        conv1d=True,
    ),
    "llama": _LLAMA,
    "qwen3": replace(_LLAMA, mlp_bias_flag=None),
    "mistral": replace(_LLAMA, mlp_bias_flag=None, attn_bias_flag=None),
    "qwen2": replace(_LLAMA, mlp_bias_flag=None, attn_bias_flag=None),
    "gpt_neox": ArchSpec(
        layers="layers",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        value="attention.query_key_value",
        value_layout="neox_fused",
        attn_bias_flag="attention_bias",
    ),
    "bert": ArchSpec(
        layers="encoder.layer",
        mlp_out="output.dense",
        attn_out="attention.output.dense",
        value="attention.self.value",
        value_layout="separate",
    ),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` of an HF model, by ``config.model_type``; unknown types raise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise NotImplementedError(
            f"Pruning does not support model_type {model_type!r}; supported: {sorted(ARCHS)}. "
            "A Llama-like model can often be added to icp_lens.pruning.arch.ARCHS as a copy of 'llama'."
        )
    return ARCHS[model_type]


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layer_module(model: nn.Module, layer: int) -> nn.Module:
    spec = arch_spec(model)
    layers = _get(model.base_model, spec.layers)
    if not 0 <= layer < len(layers):
        raise ValueError(f"Layer {layer} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    return layers[layer]


@dataclass(frozen=True)
class Site:
    """The slice of one linear map that a feature owns.

    ``axis`` says which side of the map: ``"in"`` (the feature feeds the map: its
    columns of a Linear, rows of a Conv1D) or ``"out"`` (the feature is produced by
    it: rows of a Linear and entries of its bias). ``bias_flag`` is the config flag that
    adds the bias the mean fold needs when the module has none.
    """

    module: nn.Module
    path: str  # e.g. "transformer.h.0.mlp.c_proj", for messages and the plan
    axis: Literal["in", "out"]
    index: torch.Tensor  # positions along that axis, int64
    conv1d: bool
    bias_flag: str | None

    def weight_slice(self) -> torch.Tensor:
        """The owned weights as ``[k, other]`` (k = the feature's width)."""
        w = self.module.weight
        if self.axis == "in":
            return w[self.index] if self.conv1d else w[:, self.index].T
        return w[:, self.index].T if self.conv1d else w[self.index]


def head_dim(model: nn.Module) -> int:
    """Width of one attention head (``config.head_dim`` when set, else d_model / n_heads)."""
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _path(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    return "?"  # pragma: no cover


def site_of(model: nn.Module, kind: str, layer: int, index: int) -> Site:
    """Where feature ``(kind, layer, index)`` lives in HF ``model``; bad features raise."""
    if kind not in PRUNABLE_KINDS:
        raise ValueError(unprunable_reason([kind], f"{kind!r} features"))
    spec = arch_spec(model)
    block = layer_module(model, layer)
    cfg = model.config
    width = 1 if kind == "neuron" else head_dim(model)
    if kind == "neuron":
        module = _get(block, spec.mlp_out)
        n = module.weight.shape[0] if spec.conv1d else module.weight.shape[1]
        count, axis, flag = n, "in", spec.mlp_bias_flag
    elif kind == "head":
        module = _get(block, spec.attn_out)
        count, axis, flag = cfg.num_attention_heads, "in", spec.attn_bias_flag
    else:
        module = _get(block, spec.value)
        count = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        axis, flag = "out", spec.attn_bias_flag
    if not 0 <= index < count:
        raise ValueError(f"{kind} index {index} out of range at layer {layer}: valid 0..{count - 1}")
    start = index * width
    if kind == "value" and spec.value_layout == "gpt2_fused":
        start += 2 * cfg.hidden_size
    elif kind == "value" and spec.value_layout == "neox_fused":
        start = index * 3 * width + 2 * width
    idx = torch.arange(start, start + width, device="cpu")  # indexes the weights, edited on the CPU
    return Site(module=module, path=_path(model, module), axis=axis, index=idx, conv1d=spec.conv1d, bias_flag=flag)

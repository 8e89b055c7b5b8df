"""Folding direction edits into a Hugging Face model's weights (an ordinary checkpoint out).

At each edit point the directions compose into one affine map ``x -> M x + c`` (in float64,
in the set's order, exactly as the run-time hooks apply them): ``M = prod (I - a b^T)``,
``c`` collecting ``a * target``. The fold writes that map into the module that produces
``x``:

- token / position embeddings (``hook_embed``, ``hook_pos_embed``): every row
  ``e -> M e + c`` (a tied unembedding is untied first, so the output side is unchanged);
- an attention or MLP output projection (``hook_attn_out``, ``hook_mlp_out``):
  ``W -> M W``, ``bias -> M bias + c`` (Llama-family modules without a bias get one
  through their config flag, zero-initialised, when ``c != 0``);
- a head's output ``z.H`` (the input of the attention output projection): that head's
  block of columns ``W_H -> W_H M`` and ``bias += W_H c``.

A ``resid_pre`` direction touches every writer of the residual stream, which is what
makes the edit exact (Arditi et al. 2024 orthogonalise the same matrices). Shapes never
change; GPT-2's ``Conv1D`` stores weights transposed and is handled. Architectures:
:data:`FOLDABLE_TYPES`; others (BERT's post-norm residual) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from icp_lens.directions.core import DirectionSet
from icp_lens.directions.intervene import _hf_module, _plan
from icp_lens.pruning.arch import arch_spec, head_dim

__all__ = ["fold_directions", "FoldStats", "FOLDABLE_TYPES", "check_foldable", "affine_maps"]

FOLDABLE_TYPES: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox")


@dataclass(frozen=True)
class FoldStats:
    """What a fold changed: weight entries changed, whether the unembedding was untied, biases added."""

    changed: int
    untied: bool
    biases_added: tuple[str, ...] = ()


def check_foldable(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FOLDABLE_TYPES:
        raise NotImplementedError(
            f"Direction edits fold into {list(FOLDABLE_TYPES)} models; {model_type!r} is not supported "
            "(a post-norm residual such as BERT's renormalises after each writer, so no weight edit is exact)"
        )


def affine_maps(directions: DirectionSet, mode: str, d: dict[str, int]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per edit point, ``(M, c)`` in float64 such that the edited activation is ``M x + c``.

    On the CPU, like the directions and the pruner's weight edits (float64 is missing on some accelerators).
    """
    if mode not in ("project", "mean"):
        raise ValueError(f"Only 'project' and 'mean' direction edits fold into weights, not {mode!r}")
    maps: dict[str, tuple[Tensor, Tensor]] = {}
    for hook, items in _plan(directions, directions.writers).items():
        width = d["head"] if hook.endswith("attn.hook_z") else d["model"]
        by_head: dict[int | None, tuple[Tensor, Tensor]] = {}
        for _, direction, j in items:
            identity = torch.eye(width, dtype=torch.float64, device="cpu")
            M, c = by_head.get(direction.head, (identity, torch.zeros(width, dtype=torch.float64, device="cpu")))
            a, b = direction.write.double().cpu(), direction.read.double().cpu()
            t = 0.0 if mode == "project" else float(direction.means[j])
            P = identity - torch.outer(a, b)
            by_head[direction.head] = (P @ M, P @ c + a * t)
        for head, mc in by_head.items():
            maps[hook if head is None else f"{hook}#{head}"] = mc
    return maps


def _needs_bias(model: nn.Module, maps: dict[str, tuple[Tensor, Tensor]]) -> set[str]:
    spec = arch_spec(model)
    flags: set[str] = set()
    for key, (_, c) in maps.items():
        hook = key.split("#")[0]
        if hook in ("hook_embed", "hook_pos_embed") or not bool((c != 0).any()):
            continue
        module, _ = _hf_module(model, hook)
        if module.bias is not None:
            continue
        is_attn = hook.endswith("hook_attn_out") or hook.endswith("attn.hook_z")
        flag = spec.attn_bias_flag if is_attn else spec.mlp_bias_flag
        if flag is None:
            raise ValueError(
                f"Mean mode needs a bias on the module behind {hook}, and {model.config.model_type} has no config "
                "flag that adds one; use mode='project' (or protect_first=False) for this model"
            )
        flags.add(flag)
    return flags


@torch.no_grad()
def fold_directions(model: nn.Module, directions: DirectionSet, *, mode: str = "mean") -> tuple[nn.Module, FoldStats]:
    """Write ``directions`` into ``model``'s weights (in place unless biases are added); see the module docstring."""
    check_foldable(model)
    from icp_lens.pruning.hf_edit import _with_biases

    maps = affine_maps(directions, mode, {"model": model.config.hidden_size, "head": head_dim(model)})
    added: tuple[str, ...] = ()
    flags = _needs_bias(model, maps)
    if flags:
        model, added = _with_biases(model, flags)
    untied = False
    if "hook_embed" in maps:
        from icp_lens.retrain import untie_unembedding

        head = model.get_output_embeddings()
        embed = model.get_input_embeddings()
        if head is not None:
            untied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
            untie_unembedding(model)
    conv1d = arch_spec(model).conv1d
    changed = 0
    # head inputs first: they add W_H c to the output bias, which the output-side map then transforms
    for key in sorted(maps, key=lambda k: "hook_z" not in k):
        M, c = maps[key]
        hook, _, head = key.partition("#")
        module, on_input = _hf_module(model, hook)
        weight = module.weight
        M, c = M.to(weight.device), c.to(weight.device)
        before = weight.detach().clone()
        if hook in ("hook_embed", "hook_pos_embed"):
            weight.copy_((weight.double() @ M.T + c).to(weight.dtype))
        elif on_input:
            width = head_dim(model)
            sl = slice(int(head) * width, (int(head) + 1) * width)
            W = weight[sl, :].double().T if conv1d else weight[:, sl].double()  # [d_out, d_head]
            if module.bias is not None:
                module.bias.copy_((module.bias.double() + W @ c).to(weight.dtype))
            new = W @ M
            if conv1d:
                weight[sl, :] = new.T.to(weight.dtype)
            else:
                weight[:, sl] = new.to(weight.dtype)
        else:
            W = weight.double().T if conv1d else weight.double()  # [d_out, d_in]
            new = M @ W
            weight.copy_((new.T if conv1d else new).to(weight.dtype))
            if module.bias is not None:
                module.bias.copy_((M @ module.bias.double() + c).to(weight.dtype))
        changed += int((weight != before).sum())
    return model, FoldStats(changed=changed, untied=untied, biases_added=added)

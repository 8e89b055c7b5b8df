"""Baking a PrunePlan into a Hugging Face model's weights.

For each feature (see ``icp_lens.pruning.arch`` for where it lives):

- neuron / head, zero mode: ``W_out[:, slice] = 0`` (rows for GPT-2's Conv1D);
- neuron / head, mean mode: ``b_out += mean @ W_out[slice]`` (in float64), then zero;
- value vector, zero mode: zero its rows of the value projection and its bias entries;
- value vector, mean mode: zero its rows, set its bias entries to the mean.

The shapes never change, so the result is an ordinary checkpoint of the same class.
If mean mode needs a bias a module lacks, the model is rebuilt with the config flag
that adds it (Llama ``mlp_bias`` / ``attention_bias``) and every new bias set to zero
before the fold, which leaves the function unchanged; without such a flag mean mode
is refused.

Token-embedding features (``plan.tokens``, see ``icp_lens.pruning.tokens``): their rows
of the input embedding are set to zero or to the stored vector, after a tied unembedding
is untied (the output projection keeps a copy of the original matrix, and
``config.tie_word_embeddings`` becomes ``False``). A plan without tokens never touches
the embeddings, so tied embeddings stay tied.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from icp_lens.pruning.arch import site_of
from icp_lens.pruning.plan import PrunePlan
from icp_lens.pruning.tokens import edit_token_rows

__all__ = ["apply_plan_to_model", "EditStats"]


@dataclass(frozen=True)
class EditStats:
    """What an edit changed: weight entries set to zero (that were not zero), of how many.

    ``token_rows``: input-embedding rows replaced; ``untied``: whether a tied unembedding
    was untied for them (``n_parameters`` then counts the output projection's own copy).
    """

    zeroed: int
    n_parameters: int
    biases_added: tuple[str, ...] = ()
    token_rows: int = 0
    untied: bool = False
    #: weight entries changed by folding direction features (``icp_lens.directions.fold``)
    changed: int = 0

    @property
    def zeroed_fraction(self) -> float:
        return self.zeroed / self.n_parameters if self.n_parameters else 0.0


def _n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _needed_flags(model: nn.Module, plan: PrunePlan) -> set[str]:
    flags: set[str] = set()
    for f in plan.features:
        site = site_of(model, f.kind, f.layer, f.index)
        if site.module.bias is not None:
            continue
        if site.bias_flag is None:
            raise ValueError(
                f"Mean mode needs a bias on {site.path} for {f}, and {model.config.model_type} has no config "
                "flag that adds one; use mode='zero' for this model."
            )
        flags.add(site.bias_flag)
    return flags


@torch.no_grad()
def _with_biases(model: nn.Module, flags: set[str]) -> tuple[nn.Module, tuple[str, ...]]:
    """Rebuild ``model`` with bias-adding config ``flags`` on; every new bias is zero."""
    config = copy.deepcopy(model.config)
    for flag in sorted(flags):
        setattr(config, flag, True)
    first = next(model.parameters())
    new = type(model)(config).to(device=first.device, dtype=first.dtype)
    result = new.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.endswith(".bias") for k in result.missing_keys):
        raise RuntimeError(  # pragma: no cover - would mean the flag also changed other weights
            f"Turning on {sorted(flags)} changed more than biases: {result.missing_keys[:5]}"
        )
    params = dict(new.named_parameters())
    for key in result.missing_keys:
        params[key].zero_()
    return new.eval(), tuple(result.missing_keys)


@torch.no_grad()
def apply_plan_to_model(model: nn.Module, plan: PrunePlan, *, check: bool = True) -> tuple[nn.Module, EditStats]:
    """Edit ``model`` per ``plan`` (in place unless biases must be added) and return it.

    ``check`` first verifies the plan's fingerprint against the model. The returned
    model is the one to save: it is a new object when mean mode had to add biases.
    """
    if check:
        plan.check(model)
    added: tuple[str, ...] = ()
    if plan.mode == "mean":
        flags = _needed_flags(model, plan)
        if flags:
            model, added = _with_biases(model, flags)
    zeroed = 0
    for i, f in enumerate(plan.features):
        site = site_of(model, f.kind, f.layer, f.index)
        weight = site.module.weight
        mean = None if plan.means is None else torch.tensor(plan.means[i], dtype=torch.float64, device=weight.device)
        zeroed += int((site.weight_slice() != 0).sum())
        if site.axis == "in":
            if mean is not None:
                fold = mean @ site.weight_slice().double()
                site.module.bias.copy_((site.module.bias.double() + fold).to(weight.dtype))
            if site.conv1d:
                weight[site.index] = 0
            else:
                weight[:, site.index] = 0
        else:
            if site.conv1d:
                weight[:, site.index] = 0
            else:
                weight[site.index] = 0
            if site.module.bias is not None:
                site.module.bias[site.index] = 0 if mean is None else mean.to(weight.dtype)
    token_zeroed, untied = edit_token_rows(model, plan.tokens)
    changed = 0
    if plan.directions is not None:  # after units and tokens: the run-time edit acts on their outputs
        from icp_lens.directions.fold import fold_directions

        model, fold = fold_directions(model, plan.directions, mode=plan.direction_mode)
        changed, untied, added = fold.changed, untied or fold.untied, added + fold.biases_added
    return model, EditStats(
        zeroed=zeroed + token_zeroed,
        n_parameters=_n_parameters(model),
        biases_added=added,
        token_rows=len(plan.tokens),
        untied=untied,
        changed=changed,
    )

"""Ablating features at run time: the reference a weight edit must reproduce.

Two equivalent routes, used to check each other and the exported checkpoint:

- ``plan_edits(plan)``: icp_lens ``Edit``s (``Zero`` or ``Constant(mean)`` at every
  position) for a hooked model (``TransformerBridge`` or ``HookedTransformer``), i.e. the
  very interventions the scorer measured;
- ``hf_ablation(model, features, means)``: plain PyTorch hooks on an HF model that set
  the feature's slice of the output projection's *input* (neurons, heads) or of the
  value projection's *output* (value features) to zero or to the mean. This is what
  verifies architectures no hooked model wraps (BERT), and what ``feature_means``
  captures from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from icp_lens.edits import Edit
from icp_lens.features import Feature
from icp_lens.hooks import module_hooks
from icp_lens.interventions import Constant, Zero
from icp_lens.pruning.arch import site_of

if TYPE_CHECKING:
    from icp_lens.pruning.plan import PrunePlan

__all__ = ["plan_edits", "hf_ablation"]


def plan_edits(plan: PrunePlan) -> list[Edit]:
    """The hook-point edits whose effect the plan bakes into the weights."""
    if plan.mode == "zero":
        return [Edit(f, Zero()) for f in plan.features]
    # float64 on the CPU, as the plan holds them; Constant casts to the activation's dtype and device
    return [Edit(f, Constant(torch.tensor(plan.mean_of(f), dtype=torch.float64, device="cpu"))) for f in plan.features]


def _setter(index: Tensor, value: Tensor | None):
    def set_slice(x: Tensor) -> Tensor:
        x = x.clone()
        x[..., index.to(x.device)] = 0.0 if value is None else value.to(x.dtype).to(x.device)
        return x

    return set_slice


@contextmanager
def hf_ablation(
    model: nn.Module, features: Sequence[Feature], means: Mapping[Feature, Sequence[float]] | None = None
) -> Iterator[nn.Module]:
    """Ablate ``features`` of an HF model with module hooks: zero, or their ``means``."""
    pre: dict[nn.Module, list[Any]] = {}
    post: dict[nn.Module, list[Any]] = {}
    for f in features:
        site = site_of(model, f.kind, f.layer, f.index)
        value = None if means is None else torch.tensor(list(means[f]), dtype=torch.float64, device="cpu")
        (pre if site.axis == "in" else post).setdefault(site.module, []).append(_setter(site.index, value))

    def pre_hook(fns):
        def hook(module: nn.Module, args: tuple[Any, ...]):
            x = args[0]
            for fn in fns:
                x = fn(x)
            return (x, *args[1:])

        return hook

    def post_hook(fns):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor):
            for fn in fns:
                output = fn(output)
            return output

        return hook

    with module_hooks(
        pre=[(m, pre_hook(fns)) for m, fns in pre.items()],
        post=[(m, post_hook(fns)) for m, fns in post.items()],
    ):
        yield model

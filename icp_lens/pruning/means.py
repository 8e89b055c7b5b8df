"""Mean activations of features over a reference set, for mean-mode pruning.

Mean ablation replaces a feature by its average over a reference set of inputs,
pooled over examples and positions (a bias cannot depend on the position). On a
hooked model the mean is taken at the feature's hook point, exactly as the scorer's
``mean`` intervention does (``icp_lens.interventions.means_over``); on a plain HF
model it is taken at the same place through module hooks (the input of the output
projection, or the output of the value projection). Sums are kept in float64 and
only running totals are stored, so the reference set can be of any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from icp_lens.encoding import encode_texts, length_batches
from icp_lens.features import Feature
from icp_lens.hooks import module_hooks
from icp_lens.interventions import means_over
from icp_lens.pruning.arch import site_of

__all__ = ["feature_means", "reference_texts"]


def reference_texts(reference: Any) -> list[str]:
    """Prompts of a reference set: strings, ``ProbeExample``s, a ``ProbeSet`` or a JSONL path."""
    from pathlib import Path

    from icp_lens.probes import ProbeExample, read_probes

    if isinstance(reference, (str, Path)):
        reference = read_probes(reference)
    examples = getattr(reference, "examples", reference)
    texts = [ex.prompt if isinstance(ex, ProbeExample) else ex for ex in examples]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(
            "A reference set needs at least one prompt (strings, ProbeExamples, a ProbeSet or a JSONL path)"
        )
    return texts


@torch.no_grad()
def _hf_means(model: nn.Module, features: Sequence[Feature], batches: Any) -> dict[Feature, tuple[float, ...]]:
    sites = {f: site_of(model, f.kind, f.layer, f.index) for f in features}
    modules = {id(s.module): s.module for s in sites.values()}
    axis = {id(s.module): s.axis for s in sites.values()}
    seen: dict[int, Tensor] = {}
    sums: dict[Feature, Tensor] = {}
    count = 0

    def record(key: int):
        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[key] = args[0].detach()

        def post(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            seen[key] = output.detach()

        return pre if axis[key] == "in" else post

    pre = [(m, record(k)) for k, m in modules.items() if axis[k] == "in"]
    post = [(m, record(k)) for k, m in modules.items() if axis[k] == "out"]
    with module_hooks(pre=pre, post=post):
        for _, tokens in batches:
            model(tokens)
            for f, site in sites.items():
                act = seen[id(site.module)][..., site.index].double().sum((0, 1))
                sums[f] = sums[f] + act if f in sums else act
            count += tokens.numel()
    if count == 0:
        raise ValueError("The reference set is empty")
    return {f: tuple((s / count).tolist()) for f, s in sums.items()}


@torch.no_grad()
def feature_means(
    model: Any,
    features: Sequence[Feature],
    reference: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 32,
) -> dict[Feature, tuple[float, ...]]:
    """Each feature's mean (1 value for a neuron, ``d_head`` for a head or value vector).

    ``model`` is a hooked model (means at hook points, tokenized by ``model.to_tokens``)
    or an HF model (means through module hooks; give its ``tokenizer``).
    """
    texts = reference_texts(reference)
    hooked = hasattr(model, "hook_dict")
    encoded = encode_texts(texts, model=model if hooked else None, tokenizer=tokenizer)
    device = next(model.parameters()).device
    batches = length_batches(encoded, batch_size, device=device)
    if not hooked:
        return _hf_means(model, features, batches)
    means = means_over(model, features, (tokens for _, tokens in batches))
    return {f: tuple(m.value.reshape(-1).tolist()) for f, m in means.items()}

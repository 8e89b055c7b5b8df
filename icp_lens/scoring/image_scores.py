"""Score table of a vision-language model's units under image counterfactuals.

:func:`score_image_units` is ``icp_lens.scoring.score`` for image probes: the MLP
neurons and attention heads of a LLaVA-style model's vision tower (kinds ``vision_neuron``,
``vision_head``; hooks ``vision_encoder.encoder_layers.L.mlp.hook_post`` and
``...attn.hook_z``), the projector's hidden neurons (``projector_neuron``, layer 0:
``vision_projector.hook_hidden``, the input of its ``linear_2``, a hook point
:mod:`icp_lens.hooks` adds) and the language model's (``neuron``, ``head``:
``blocks.L.mlp.hook_post``, ``blocks.L.attn.hook_z``), run through a ``TransformerBridge``, each get
the spuriousness ``S(u) = mean_i |dP_i(u)|`` with a bootstrap interval, in a
:class:`~icp_lens.scoring.table.ScoreTable` that ``icp-lens prune`` reads. ``dP_i(u)``
is how far example ``i``'s answer margin (answer logit minus the mean other candidate,
the answer being the model's own choice on the clean image) moves when unit ``u`` alone
takes its value on the image counterfactual (same object, other background):

``exact``
    patching, one unit at a time (``units_per_pass`` units share a forward pass, the
    batch repeated once per unit; rows never interact, so the values are the same);
``attribution``
    attribution patching (AtP): ``dP_i(u) ~ sum_pos (a'(u) - a(u)) . dm/da(u)`` (a head's
    ``a(u)`` is its ``d_head`` vector), one
    forward and one backward pass per batch for every unit at once;
``hybrid``
    attribution ranks every unit, and the ``verify_top`` highest are patched exactly
    (the ``exact`` column says which rows are exact).

The images have no causal counterfactuals, so ``selectivity`` is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from icp_lens.features import Feature
from icp_lens.hooks import capturing, hooked
from icp_lens.scoring.effects import Effects
from icp_lens.scoring.image_patching import _last_logits, candidate_margin, patched_unit_margins
from icp_lens.scoring.table import ScoreTable

__all__ = ["IMAGE_KINDS", "ImageMethod", "IMAGE_METHODS", "image_units", "score_image_units"]

#: the feature kinds of a LLaVA-style model that image probes score (and the pruner edits)
IMAGE_KINDS: tuple[str, ...] = ("vision_neuron", "vision_head", "projector_neuron", "neuron", "head")
ImageMethod = Literal["hybrid", "attribution", "exact"]
IMAGE_METHODS: tuple[str, ...] = get_args(ImageMethod)


def _hf_config(model: Any) -> Any:
    hf = getattr(model, "original_model", model)
    config = getattr(hf, "config", None)
    if config is None or not hasattr(config, "vision_config") or not hasattr(config, "text_config"):
        raise ValueError("image scoring needs a vision-language model (a LLaVA-style config with vision_config)")
    return config


def image_units(model: Any, kinds: Sequence[str] = IMAGE_KINDS, layers: Sequence[int] | None = None) -> list[Feature]:
    """Every unit of ``kinds`` in ``model`` (bridge or HF model), in ``layers`` of each tower (default all)."""
    bad = [k for k in kinds if k not in IMAGE_KINDS]
    if bad or not kinds:
        raise ValueError(f"image probes score the kinds {list(IMAGE_KINDS)}; got {list(kinds)}")
    config = _hf_config(model)
    out = []
    for kind in kinds:
        if kind == "projector_neuron":  # one hidden layer, numbered 0: the input width of linear_2
            if layers is None or 0 in layers:
                out += [Feature(kind, 0, i) for i in range(_projector_width(model))]
            continue
        tower = config.vision_config if kind.startswith("vision_") else config.text_config
        n_layers = tower.num_hidden_layers
        width = tower.num_attention_heads if kind.endswith("head") else tower.intermediate_size
        chosen = range(n_layers) if layers is None else [layer for layer in layers if layer < n_layers]
        out += [Feature(kind, layer, i) for layer in chosen for i in range(width)]  # type: ignore[arg-type]
    if not out:
        raise ValueError(f"no units in layers {list(layers or [])} of kinds {list(kinds)}")
    return out


def _projector_width(model: Any) -> int:
    from icp_lens.pruning.multimodal import llava_out_proj

    return int(llava_out_proj(getattr(model, "original_model", model), "vision_projector.hook_hidden").in_features)


def _is_head(hook_name: str) -> bool:
    return hook_name.endswith("attn.hook_z")


def _by_hook(features: Sequence[Feature]) -> dict[str, list[int]]:
    hooks: dict[str, list[int]] = {}
    for f in features:
        hooks.setdefault(f.hook_name, []).append(f.index)
    return hooks


def _batch_values(
    model: Any, ids: Tensor, pixels: Tensor, counterfactual: Tensor, label_ids: Sequence[int],
    features: Sequence[Feature], *, exact: bool, units_per_pass: int,
) -> tuple[Float[Tensor, "f n"], Float[Tensor, " n"]]:  # fmt: skip
    """``dP`` of every feature on one batch (exact patching or AtP) and the clean margins."""
    hooks = _by_hook(features)
    with torch.no_grad():
        clean_logits = _last_logits(model, ids, pixels)
        answers = clean_logits[:, list(label_ids)].argmax(-1)
        clean = candidate_margin(clean_logits, label_ids, answers)
        with capturing(model, list(hooks)) as cache:
            _last_logits(model, ids, counterfactual)
    values: dict[str, Tensor] = {}
    if exact:
        for name, units in hooks.items():
            margins = patched_unit_margins(model, ids, pixels, cache[name], label_ids, answers, name, units,
                                           units_per_pass, head_axis=_is_head(name))  # fmt: skip
            values[name] = margins - clean.cpu()
    else:
        acts: dict[str, Tensor] = {}

        def keeper(name: str) -> Any:
            def keep(act: Tensor, hook: Any) -> Tensor:
                acts[name] = act  # keyed by the name asked for (the bridge may report an alias)
                return act

            return keep

        with torch.enable_grad(), hooked(model, [(name, keeper(name)) for name in hooks]):
            margin = candidate_margin(_last_logits(model, ids, pixels.detach().requires_grad_(True)), label_ids,
                                      answers)  # fmt: skip
            names = list(hooks)
            grads = torch.autograd.grad(margin.sum(), [acts[name] for name in names], allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            act = acts[name].detach()
            grad = torch.zeros_like(act) if grad is None else grad
            delta = (cache[name].to(act.dtype) - act).float() * grad.float()  # [n, pos, d] or [n, pos, h, d]
            per_unit = delta.sum(-1) if _is_head(name) else delta
            values[name] = per_unit.sum(1)[:, hooks[name]].T.cpu()
    rows = {name: 0 for name in hooks}
    out = torch.empty(len(features), ids.shape[0], device="cpu")
    for j, f in enumerate(features):
        out[j] = values[f.hook_name][rows[f.hook_name]]
        rows[f.hook_name] += 1
    return out, clean.float().cpu()


def _effects(
    model: Any, data: Any, features: Sequence[Feature], *, exact: bool, batch_size: int, units_per_pass: int,
    progress: bool, desc: str,
) -> Effects:  # fmt: skip
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    keep = data.has_counterfactual.nonzero().flatten()
    chunks = [keep[s : s + batch_size] for s in range(0, keep.numel(), batch_size)]
    values, clean = [], []
    for rows in tqdm(chunks, desc=desc, disable=not progress, unit="batch", leave=False):
        pixels = data.pixel_values[rows].to(device)
        ids = data.input_ids.to(device).expand(rows.numel(), -1)
        v, c = _batch_values(model, ids, pixels, data.counterfactual[rows].to(device), data.label_ids, features,
                             exact=exact, units_per_pass=units_per_pass)  # fmt: skip
        values.append(v)
        clean.append(c)
    return Effects(tuple(features), "resample", torch.cat(values, 1), torch.cat(clean), exact=exact)


def score_image_units(
    model: Any,
    data: Any,
    *,
    kinds: Sequence[str] = IMAGE_KINDS,
    layers: Sequence[int] | None = None,
    method: ImageMethod = "hybrid",
    verify_top: int | float = 100,
    batch_size: int = 32,
    units_per_pass: int = 16,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> ScoreTable:
    """Score the units of a LLaVA-style ``TransformerBridge`` on image probes (see the module docstring).

    ``data`` is a :class:`~icp_lens.training.multimodal.MultimodalData` (e.g. from
    ``data_from_probes``); only its rows with an image counterfactual are used.
    ``verify_top`` (hybrid) is a count or a fraction in (0, 1] of the units.
    """
    from icp_lens.scoring.hybrid import _verify_count

    if method not in IMAGE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(IMAGE_METHODS)}")
    if batch_size < 1 or units_per_pass < 1:
        raise ValueError(f"batch_size and units_per_pass must be >= 1, got {batch_size}, {units_per_pass}")
    if data.counterfactual is None or data.has_counterfactual is None or not bool(data.has_counterfactual.any()):
        raise ValueError("image scoring needs rows with an image_counterfactual (the spurious counterfactual)")
    features = image_units(model, kinds, layers)
    common = {"batch_size": batch_size, "units_per_pass": units_per_pass, "progress": progress}

    def table(exact: bool, subset: Sequence[Feature]) -> ScoreTable:
        desc = "exact patching" if exact else "attribution"
        effects = _effects(model, data, subset, exact=exact, desc=desc, **common)
        return ScoreTable.from_effects([effects], n_boot=n_boot, seed=seed)

    if method != "hybrid":
        return table(method == "exact", features)
    estimate = table(False, features)
    n_verify = _verify_count(verify_top, len(features))
    if n_verify == 0:
        return estimate
    top = estimate.features[:n_verify]
    verified = table(True, top).frame
    rest = estimate.frame[~estimate.frame["feature"].isin({str(f) for f in top})]
    return ScoreTable(pd.concat([verified, rest], ignore_index=True))

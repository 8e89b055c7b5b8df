"""Exact patching effects of image counterfactuals, across a vision-language model's towers.

For a LLaVA-style model run through a ``TransformerBridge`` (or any model whose hook
points :func:`icp_lens.hooks.hooked` reaches and that takes ``pixel_values``), the
*spurious effect* of a hook point (or of one unit of it) is how far the answer's margin
moves when that activation, and only it, takes its value on the image counterfactual
(the same scene with only the spurious attribute changed)::

    effect(u) = mean_i [ m(x_i | do(u = u(x_i'))) - m(x_i) ],   m = answer logit - mean other candidate logit

the same quantity the text scorers compute with ``resample`` interventions
(:mod:`icp_lens.scoring.exact`), here with the counterfactual in the image. The hook
points may lie in the vision tower (``vision_encoder.encoder_layers.L.mlp.hook_post``:
its neurons), the projector (``vision_projector.hook_out``) or the language model
(``blocks.L.mlp.hook_post``). ``total`` is ``m(x') - m(x)``: patching every path
(``vision_projector.hook_out`` carries all of the image) reproduces it.

One trap of the bridge on LLaVA: the language model reads the vision tower's *recorded*
hidden state of its ``vision_feature_layer``, which transformers records before the
bridge's ``hook_out`` of that layer runs, so patching the ``hook_out`` of the vision
layer LLaVA reads (the last one on the organism) changes nothing. Patch a unit inside
it (``...mlp.hook_post``, ``...attn.hook_out``) or ``vision_projector.hook_in`` instead.

With ``per_unit=True`` every unit (last axis) of each hook point is patched on its own;
``units_per_pass`` units share one forward pass, the batch repeated once per unit (rows
never interact, so the result equals one pass per unit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from icp_lens.hooks import capturing, hooked

__all__ = ["image_patch_effects", "candidate_margin", "patched_unit_margins"]


def candidate_margin(logits: Float[Tensor, "n vocab"], label_ids: Sequence[int], answers: Int[Tensor, " n"]) -> Tensor:
    """Answer logit minus the mean of the other candidates' logits, per row (fp32)."""
    cand = logits[:, list(label_ids)].float()
    own = cand.gather(1, answers.view(-1, 1).to(cand.device)).squeeze(1)
    return own - (cand.sum(1) - own) / (cand.shape[1] - 1)


def _last_logits(model: Any, ids: Tensor, pixels: Tensor) -> Tensor:
    out = model(ids, pixel_values=pixels)
    return (out.logits if hasattr(out, "logits") else out)[:, -1]


@torch.no_grad()
def patched_unit_margins(
    model: Any,
    ids: Int[Tensor, "n pos"],
    pixels: Float[Tensor, "n 3 h w"],
    source: Float[Tensor, "n ..."],
    label_ids: Sequence[int],
    answers: Int[Tensor, " n"],
    hook_name: str,
    units: Sequence[int],
    units_per_pass: int = 16,
    *,
    head_axis: bool = False,
) -> Float[Tensor, "k n"]:
    """The answer margin of each row with one unit of ``hook_name`` set to its value in ``source``.

    Row ``j`` of the result patches ``units[j]`` alone (last axis of the activation; with
    ``head_axis`` the second-last, a head's whole ``d_head`` vector of ``hook_z``);
    ``units_per_pass`` units share one forward pass, the batch repeated once per unit (rows
    never interact, so the result equals one pass per unit). Margins in fp32, on the CPU.
    """
    n = pixels.shape[0]
    out = []
    for start in range(0, len(units), units_per_pass):
        chunk = list(units[start : start + units_per_pass])
        k = len(chunk)

        def patch(act: Tensor, hook: Any, chunk: list[int] = chunk) -> Tensor:
            act = act.clone()
            for j, unit in enumerate(chunk):
                if head_axis:
                    act[j * n : (j + 1) * n, ..., unit, :] = source[..., unit, :].to(act.dtype)
                else:
                    act[j * n : (j + 1) * n, ..., unit] = source[..., unit].to(act.dtype)
            return act

        with hooked(model, [(hook_name, patch)]):
            logits = _last_logits(model, ids.repeat(k, 1), pixels.repeat(k, 1, 1, 1))
        out.append(candidate_margin(logits, label_ids, answers.repeat(k)).view(k, n).cpu())
    return torch.cat(out) if out else torch.zeros(0, n, device="cpu")


@torch.no_grad()
def image_patch_effects(
    model: Any,
    input_ids: Int[Tensor, " pos"],
    pixels: Float[Tensor, "n 3 h w"],
    counterfactual: Float[Tensor, "n 3 h w"],
    label_ids: Sequence[int],
    hooks: Sequence[str],
    *,
    answers: Int[Tensor, " n"] | None = None,
    per_unit: bool = False,
    units_per_pass: int = 16,
) -> pd.DataFrame:
    """The spurious effect of each hook point (or unit) under image counterfactuals.

    ``answers`` (class indices into ``label_ids``) default to the model's choice on the
    clean image, so the margin is that choice's and effects do not cancel across classes
    (on a balanced set the signed effects towards the *correct* answer would). Returns one
    row per hook point (``index = -1``) or per unit: ``hook_name, index, effect,
    abs_effect, share`` (``share = effect / total``), with ``total`` (the mean
    ``m(x') - m(x)``) and ``n`` in ``DataFrame.attrs``.
    """
    if len(label_ids) < 2:
        raise ValueError("label_ids needs the answer and at least one alternative")
    if pixels.shape != counterfactual.shape:
        raise ValueError(f"images {tuple(pixels.shape)} and counterfactuals {tuple(counterfactual.shape)} differ")
    if units_per_pass < 1:
        raise ValueError(f"units_per_pass must be >= 1, got {units_per_pass}")
    device = next(model.parameters()).device
    pixels, counterfactual = pixels.to(device), counterfactual.to(device)
    n = pixels.shape[0]
    ids = input_ids.to(device).expand(n, -1)
    clean_logits = _last_logits(model, ids, pixels)
    if answers is None:  # the model's own choice on the clean image
        answers = clean_logits[:, list(label_ids)].argmax(-1)
    answers = answers.to(device)
    clean = candidate_margin(clean_logits, label_ids, answers)
    with capturing(model, list(hooks)) as cache:
        swapped = candidate_margin(_last_logits(model, ids, counterfactual), label_ids, answers)
    total = float((swapped - clean).mean())
    rows = []
    for name in hooks:
        source = cache[name]
        if not per_unit:
            with hooked(model, [(name, lambda act, hook, src=source: src)]):
                patched = candidate_margin(_last_logits(model, ids, pixels), label_ids, answers)
            rows.append({"hook_name": name, "index": -1, "effect": float((patched - clean).mean())})
            continue
        head = name.endswith("attn.hook_z")  # [n, pos, heads, d_head]: a unit is one head
        units = list(range(source.shape[-2] if head else source.shape[-1]))
        margins = patched_unit_margins(model, ids, pixels, source, label_ids, answers, name, units, units_per_pass,
                                       head_axis=head)  # fmt: skip
        for unit, effect in zip(units, (margins - clean.cpu()).mean(1).tolist(), strict=True):
            rows.append({"hook_name": name, "index": unit, "effect": effect})
    frame = pd.DataFrame(rows, columns=["hook_name", "index", "effect"])
    frame["abs_effect"] = frame["effect"].abs()
    frame["share"] = frame["effect"] / total if total != 0 else float("nan")
    frame.attrs.update(total=total, n=n)
    return frame

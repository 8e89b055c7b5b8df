"""Directions of the image tokens: the spurious attribute removed where the image enters the language model.

In a LLaVA-style model the whole image reaches the language model through the
projector's output, one ``d_model`` vector per image token (``vision_projector.hook_out``
on the bridge). A spurious attribute of the image that the answer reads (the background
of the multimodal organism) must be written there, so a direction of that space is the
natural unit to remove: it keeps the rest of each token, unlike a neuron.

**Fit** (no group labels; image counterfactuals): for each image ``x`` and its spurious
counterfactual ``x'`` (same object, other background) the paired differences
``h(x') - h(x)`` of every image token are the rows; the directions are their ``rank``
leading right-singular vectors (uncentred, so sign-free: a pair may swap the attribute
either way, land to water or water to land, where a plain mean of the differences would
cancel), orthonormal rows ``V [k, d]``, each sign-aligned with the mean difference.
``m = V h`` averaged over the fitting images and tokens (both versions) is the attribute's
mean coordinate.

**Edit** (``mean`` mode): ``h <- h - V^T (V h - m)``: the coordinates along ``V`` are held at
their mean whatever the image, the orthogonal complement is untouched. The projector's
last linear layer writes ``h = W a + b``, so the edit folds into it exactly:
``W <- (I - V^T V) W`` and ``b <- (I - V^T V) b + V^T m`` (shapes unchanged; any loader reads
the checkpoint). :func:`fold_image_directions` does that and the run-time hook
(:func:`applying_image_directions`) computes the same logits to float round-off.

**Score**: :func:`image_direction_effects` takes, for each direction alone, its
coordinate from ``x'`` and the rest from ``x`` (``h + v (v . (h' - h))``) and reports the
mean change of the answer margin beside ``total``, the change when the whole image is
swapped: ``share`` is the part of the shortcut that runs through that direction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from icp_lens.hooks import capturing, hooked
from icp_lens.scoring.image_patching import candidate_margin

__all__ = [
    "PROJECTOR_HOOK",
    "ImageDirections",
    "projector_tokens",
    "fit_image_directions",
    "applying_image_directions",
    "image_direction_effects",
    "projector_linear",
    "fold_image_directions",
]

#: the bridge's hook on the projector's output: every image token as the language model receives it
PROJECTOR_HOOK = "vision_projector.hook_out"


@dataclass(frozen=True, eq=False)
class ImageDirections:
    """``rank`` orthonormal directions of the image-token space and the mean coordinate along each."""

    vectors: Float[Tensor, "k d"]
    means: Float[Tensor, " k"]
    hook_name: str = PROJECTOR_HOOK
    source: str = "paired-svd-1"

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.means.shape != (self.vectors.shape[0],):
            raise ValueError(f"vectors [k, d] and means [k] needed, got {tuple(self.vectors.shape)} and "
                             f"{tuple(self.means.shape)}")  # fmt: skip
        gram = self.vectors.double() @ self.vectors.double().T
        if (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max() > 1e-6:
            raise ValueError("the directions must be orthonormal rows")

    @property
    def rank(self) -> int:
        return int(self.vectors.shape[0])

    def edit(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """``h - V^T (V h - m)`` in fp32 or better, returned in ``h``'s dtype."""
        dtype = torch.promote_types(h.dtype, torch.float32)
        v = self.vectors.to(device=h.device, dtype=dtype)
        m = self.means.to(device=h.device, dtype=dtype)
        x = h.to(dtype)
        return (x - (x @ v.T - m) @ v).to(h.dtype)

    def digest(self) -> str:
        """SHA-256 of the vectors and means (float64 bytes): what an export records."""
        h = hashlib.sha256()
        for t in (self.vectors, self.means):
            h.update(t.detach().double().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


@torch.no_grad()
def projector_tokens(
    model: Any, ids: Tensor, pixels: Float[Tensor, "n 3 h w"], *, batch_size: int = 64
) -> Float[Tensor, "n tokens d"]:
    """The projector's output for each image (``[n, image tokens, d_model]``, fp32 on the CPU), on the bridge."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(device)
        with capturing(model, [PROJECTOR_HOOK]) as cache:
            model(ids.to(device).expand(chunk.shape[0], -1), pixel_values=chunk)
        out.append(cache[PROJECTOR_HOOK].float().cpu())
    return torch.cat(out)


def _paired(data: Any, rows: Tensor | None) -> Tensor:
    if data.counterfactual is None or data.has_counterfactual is None:
        raise ValueError("fitting or scoring image directions needs image counterfactuals (image_counterfactual)")
    paired = data.has_counterfactual.nonzero().flatten()
    if rows is not None:
        paired = paired[torch.isin(paired, torch.as_tensor(rows))]
    if paired.numel() < 2:
        raise ValueError(f"{paired.numel()} rows with an image counterfactual; at least 2 needed")
    return paired


def fit_image_directions(
    model: Any, data: Any, *, rank: int = 1, rows: Sequence[int] | Tensor | None = None, batch_size: int = 64
) -> ImageDirections:
    """Fit ``rank`` directions of the projector's output from image counterfactual pairs (see the module doc).

    ``model`` is a ``TransformerBridge`` on a LLaVA-style model; ``data`` a
    :class:`~icp_lens.training.multimodal.MultimodalData` (``data_from_probes``) whose rows
    carry ``image_counterfactual``; ``rows`` limits the fit to those rows (e.g. a probe split).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    paired = _paired(data, None if rows is None else torch.as_tensor(rows))
    h = projector_tokens(model, data.input_ids, data.pixel_values[paired], batch_size=batch_size)
    h_cf = projector_tokens(model, data.input_ids, data.counterfactual[paired], batch_size=batch_size)
    d = h.shape[-1]
    delta = (h_cf - h).reshape(-1, d).double()
    if rank > min(delta.shape):
        raise ValueError(f"rank {rank} exceeds what {delta.shape[0]} token differences in {d} dimensions support")
    _, _, vh = torch.linalg.svd(delta, full_matrices=False)
    vectors = vh[:rank]
    signs = torch.sign(vectors @ delta.mean(0))
    vectors = vectors * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    means = torch.cat([h, h_cf]).reshape(-1, d).double().mean(0) @ vectors.T
    return ImageDirections(vectors=vectors.float(), means=means.float(), source=f"paired-svd-{rank}")


@contextmanager
def applying_image_directions(model: Any, directions: ImageDirections) -> Iterator[Any]:
    """Within the block, the bridge's image tokens have their coordinates along the directions at the mean."""

    def edit(act: Tensor, hook: Any) -> Tensor:
        return directions.edit(act)

    with hooked(model, [(directions.hook_name, edit)]):
        yield model


@torch.no_grad()
def image_direction_effects(
    model: Any, data: Any, directions: ImageDirections, *, rows: Sequence[int] | Tensor | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:  # fmt: skip
    """Each direction's resample effect on the answer margin, beside the whole image's (``total``).

    One row per direction: ``effect`` = mean over the pairs of ``m(x | v-coordinate from x')
    - m(x)``, ``total`` = mean ``m(x') - m(x)``, ``share = effect / total``; margins as the
    image scorers compute them (answer logit minus the mean other candidate, fp32).
    """
    paired = _paired(data, None if rows is None else torch.as_tensor(rows))
    device = next(model.parameters()).device
    labels = list(data.label_ids)
    sums = torch.zeros(directions.rank + 2, dtype=torch.float64)  # base, swapped, one per direction
    for start in range(0, paired.numel(), batch_size):
        idx = paired[start : start + batch_size]
        ids = data.input_ids.to(device).expand(idx.numel(), -1)
        pixels, swapped = data.pixel_values[idx].to(device), data.counterfactual[idx].to(device)
        answers = data.labels[idx]
        with capturing(model, [directions.hook_name]) as cache:
            base = model(ids, pixel_values=pixels)
            h = cache[directions.hook_name]
            other = model(ids, pixel_values=swapped)
            h_cf = cache[directions.hook_name]
        margins = [candidate_margin(_last(base), labels, answers), candidate_margin(_last(other), labels, answers)]
        diff = h_cf.float() - h.float()
        for v in directions.vectors.to(device=device, dtype=torch.float32):

            def resample(act: Tensor, hook: Any, v: Tensor = v, diff: Tensor = diff) -> Tensor:
                return (act.float() + (diff @ v)[..., None] * v).to(act.dtype)

            with hooked(model, [(directions.hook_name, resample)]):
                margins.append(candidate_margin(_last(model(ids, pixel_values=pixels)), labels, answers))
        sums += torch.stack([m.double().sum().cpu() for m in margins])
    mean = sums / paired.numel()
    total = float(mean[1] - mean[0])
    effects = (mean[2:] - mean[0]).tolist()
    return pd.DataFrame({
        "hook_name": directions.hook_name, "index": range(directions.rank), "effect": effects,
        "abs_effect": [abs(e) for e in effects], "total": total,
        "share": [e / total if total else float("nan") for e in effects], "n_pairs": paired.numel(),
    })  # fmt: skip


def _last(out: Any) -> Tensor:
    return (out.logits if hasattr(out, "logits") else out)[:, -1]


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


@torch.no_grad()
def fold_image_directions(model: nn.Module, directions: ImageDirections) -> nn.Linear:
    """Fold the mean-mode edit into the projector's last linear layer of the HF ``model``, in place.

    ``W <- (I - V^T V) W``, ``b <- (I - V^T V) b + V^T m`` (computed in float64, stored in the
    layer's dtype); returns the edited layer. The layer must have a bias (LLaVA's has).
    """
    if directions.hook_name != PROJECTOR_HOOK:
        raise ValueError(f"only directions at {PROJECTOR_HOOK} fold into the projector, got {directions.hook_name}")
    layer = projector_linear(model)
    if layer.bias is None:
        raise ValueError("the projector's last linear layer has no bias; the mean cannot be folded")
    v = directions.vectors.double().to(layer.weight.device)
    keep = torch.eye(v.shape[1], dtype=torch.float64, device=v.device) - v.T @ v
    layer.weight.copy_((keep @ layer.weight.double()).to(layer.weight.dtype))
    layer.bias.copy_((keep @ layer.bias.double() + v.T @ directions.means.double().to(v.device)).to(layer.bias.dtype))
    return layer

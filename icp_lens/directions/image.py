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

**Keeping the object** (``keep_causal``, on by default when the rows carry
``image_causal_counterfactual``: the other object on the same background). The spurious
directions may also carry the object's evidence: where background and bird move the same
coordinates, holding them fixed blinds the model to the bird too (on the organism, a
rank-1 edit can leave a model that answers one class). The causal differences
``h(x_c) - h(x)`` give ``keep_causal`` directions ``C`` by the same paired SVD, and ``V`` is
made orthogonal to them (``V <- orth(V - V C^T C)``, rows re-normalised, signs kept): the
edit then never moves a token along ``C``, so the object's coordinates survive exactly.
``cos_causal`` records, per direction, the cosine between the spurious direction before
this step and the causal subspace (the norm of its projection onto ``span(C)``): near 1,
background and object share their coordinates and little is left to remove.

**Edit** (``mean`` mode): ``h <- h - V^T (V h - m)``: the coordinates along ``V`` are held at
their mean whatever the image, the orthogonal complement is untouched. The projector's
last linear layer writes ``h = W a + b``, so the edit folds into it exactly:
``W <- (I - V^T V) W`` and ``b <- (I - V^T V) b + V^T m`` (shapes unchanged; any loader reads
the checkpoint). :func:`fold_image_directions` does that and the run-time hook
(:func:`applying_image_directions`) computes the same logits to float round-off.

**Sites.** ``site="projector"`` (the default, :data:`PROJECTOR_HOOK`) is described above.
``site="vision_embed"`` (:data:`VISION_EMBED_HOOK`) fits the directions on the vision
tower's embeddings instead, every patch token and the class token before the first
layer (``vision_encoder.embeddings.hook_out``): there a token is still a linear map of
its own pixels (``W x_i + pos_i``), so a background colour and an object's shape need not
share a direction yet, where after the tower they may. That edit folds into the
embeddings exactly: ``W <- (I - P) W`` (the patch convolution, per output channel),
``class <- (I - P) class``, ``pos_i <- (I - P) pos_i + V^T m`` with ``P = V^T V``.
``site="vision_attn_out"`` / ``"vision_mlp_out"`` with ``layer=L`` fit them on what vision
layer ``L``'s attention or MLP writes into the tower's residual stream
(``vision_encoder.encoder_layers.L.hook_attn_out`` / ``hook_mlp_out``, every patch and the
class token): one writer's output, which folds into that writer (``out_proj`` or ``fc2``)
exactly as at the projector. It removes the attribute from that writer only; what earlier
writers (the embeddings) put in the residual stream passes by it, so a background that
enters with the pixels is not removed there (compare the sites on your model: the
benchmark ``benchmarks/multimodal_directions.py`` does on the organism). The tower's
residual stream itself has no such site: its first writer is the pre-layer norm, whose
elementwise scale cannot hold a projection, so no weight edit is exact there.

**Score**: :func:`image_direction_effects` takes, for each direction alone, its
coordinate from ``x'`` and the rest from ``x`` (``h + v (v . (h' - h))``) and reports the
mean change of the answer margin beside ``total``, the change when the whole image is
swapped: ``share`` is the part of the shortcut that runs through that direction.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from icp_lens.directions.estimators import paired_svd
from icp_lens.hooks import capturing, hooked
from icp_lens.scoring.image_patching import candidate_margin

__all__ = [
    "PROJECTOR_HOOK",
    "VISION_EMBED_HOOK",
    "IMAGE_DIRECTION_SITES",
    "VISION_OUT_HOOKS",
    "image_direction_hook",
    "ImageDirections",
    "site_tokens",
    "projector_tokens",
    "fit_image_directions",
    "applying_image_directions",
    "image_direction_values",
    "image_direction_effects",
    "image_direction_scores",
    "sidecar_path",
    "save_image_directions",
    "load_image_directions",
]

#: the bridge's hook on the projector's output: every image token as the language model receives it
PROJECTOR_HOOK = "vision_projector.hook_out"
#: the bridge's hook on the vision tower's embeddings (patch + class tokens with positions, before any layer)
VISION_EMBED_HOOK = "vision_encoder.embeddings.hook_out"
#: the vision tower's attention and MLP outputs of one layer (what out_proj and fc2 write into its residual stream)
VISION_OUT_HOOKS: dict[str, str] = {
    "vision_attn_out": "vision_encoder.encoder_layers.{layer}.hook_attn_out",
    "vision_mlp_out": "vision_encoder.encoder_layers.{layer}.hook_mlp_out",
}
#: where image directions can be fitted and folded: site name -> bridge hook (``{layer}``: a site of one layer)
IMAGE_DIRECTION_SITES: dict[str, str] = {"projector": PROJECTOR_HOOK, "vision_embed": VISION_EMBED_HOOK,
                                         **VISION_OUT_HOOKS}  # fmt: skip
_VISION_OUT = re.compile(r"vision_encoder\.encoder_layers\.(\d+)\.hook_(attn|mlp)_out")


def image_direction_hook(site: str, layer: int | None = None) -> str:
    """The bridge hook of an image direction ``site`` (:data:`IMAGE_DIRECTION_SITES`); the vision tower's
    module outputs (``vision_attn_out``, ``vision_mlp_out``) need their ``layer``, the others take none."""
    if site not in IMAGE_DIRECTION_SITES:
        raise ValueError(f"unknown image direction site {site!r}; valid: {list(IMAGE_DIRECTION_SITES)}")
    if (site in VISION_OUT_HOOKS) != (layer is not None):
        need = "one layer of the vision tower (layer=L)" if site in VISION_OUT_HOOKS else "no layer"
        raise ValueError(f"image direction site {site!r} takes {need}, got layer={layer}")
    if layer is not None and layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return IMAGE_DIRECTION_SITES[site].format(layer=layer)


_FORMAT = "icp_lens.image_directions/1"


@dataclass(frozen=True, eq=False)
class ImageDirections:
    """``rank`` orthonormal directions of the image-token space and the mean coordinate along each."""

    vectors: Float[Tensor, "k d"]
    means: Float[Tensor, " k"]
    hook_name: str = PROJECTOR_HOOK
    source: str = "paired-svd-1"
    #: per direction, its cosine with the kept causal subspace before it was made orthogonal (None: none kept)
    cos_causal: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.means.shape != (self.vectors.shape[0],):
            raise ValueError(f"vectors [k, d] and means [k] needed, got {tuple(self.vectors.shape)} and "
                             f"{tuple(self.means.shape)}")  # fmt: skip
        if self.cos_causal is not None and len(self.cos_causal) != self.vectors.shape[0]:
            raise ValueError(f"{len(self.cos_causal)} causal cosines for {self.vectors.shape[0]} directions")
        gram = self.vectors.double() @ self.vectors.double().T
        if (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max() > 1e-6:
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
def site_tokens(
    model: Any, ids: Tensor, pixels: Float[Tensor, "n 3 h w"], *, batch_size: int = 64, hook_name: str = PROJECTOR_HOOK
) -> Float[Tensor, "n tokens d"]:
    """The activation at ``hook_name`` for each image (``[n, tokens, d]``, fp32 on the CPU), on the bridge.

    By default the projector's output (``[n, image tokens, d_model]``); any hook of
    :func:`image_direction_hook` (the vision embeddings, a vision layer's output) works.
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(device)
        with capturing(model, [hook_name]) as cache:
            model(ids.to(device).expand(chunk.shape[0], -1), pixel_values=chunk)
        if hook_name not in cache:
            raise ValueError(f"{hook_name} did not fire on this model; image direction sites: {IMAGE_DIRECTION_SITES}")
        out.append(cache[hook_name].float().cpu())
    return torch.cat(out)


#: the name :func:`site_tokens` had when the projector was the only site (kept for callers)
projector_tokens = site_tokens


def _paired(data: Any, rows: Tensor | None, *, causal: bool = False) -> Tensor:
    images, has = (data.causal, data.has_causal) if causal else (data.counterfactual, data.has_counterfactual)
    if images is None or has is None:
        field = "image_causal_counterfactual" if causal else "image_counterfactual"
        raise ValueError(f"fitting or scoring image directions needs image counterfactuals ({field})")
    paired = has.nonzero().flatten()
    if rows is not None:
        paired = paired[torch.isin(paired, torch.as_tensor(rows, device="cpu"))]
    if paired.numel() < 2:
        raise ValueError(f"{paired.numel()} rows with an image counterfactual; at least 2 needed")
    return paired


def fit_image_directions(
    model: Any, data: Any, *, rank: int = 1, rows: Sequence[int] | Tensor | None = None, batch_size: int = 64,
    keep_causal: int | None = None, site: str = "projector", layer: int | None = None,
) -> ImageDirections:  # fmt: skip
    """Fit ``rank`` directions of the image tokens at one ``site`` from image counterfactual pairs (module doc).

    ``model`` is a ``TransformerBridge`` on a LLaVA-style model; ``data`` a
    :class:`~icp_lens.training.multimodal.MultimodalData` (``data_from_probes``) whose rows
    carry ``image_counterfactual``; ``rows`` limits the fit to those rows (e.g. a probe split).
    ``keep_causal``: how many causal directions (from ``image_causal_counterfactual``, read
    with ``data_from_probes(..., causal=True)``) the spurious ones are made orthogonal to;
    ``None`` is 1 when ``data`` has causal images and 0 otherwise, 0 turns it off.
    ``site``: ``projector`` (the image tokens as the language model receives them),
    ``vision_embed`` (the vision tower's embeddings), or ``vision_attn_out`` / ``vision_mlp_out``
    of vision ``layer`` (what that layer's attention or MLP writes; see the module doc).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    hook = image_direction_hook(site, layer)
    has_causal = getattr(data, "causal", None) is not None
    if keep_causal is None:
        keep_causal = 1 if has_causal else 0
    if keep_causal < 0:
        raise ValueError(f"keep_causal must be >= 0, got {keep_causal}")
    if keep_causal and not has_causal:
        raise ValueError("keep_causal needs the rows' image_causal_counterfactual: read the probes with "
                         "data_from_probes(..., causal=True)")  # fmt: skip
    subset = None if rows is None else torch.as_tensor(rows, device="cpu")
    paired = _paired(data, subset)
    h = site_tokens(model, data.input_ids, data.pixel_values[paired], batch_size=batch_size, hook_name=hook)
    h_cf = site_tokens(model, data.input_ids, data.counterfactual[paired], batch_size=batch_size, hook_name=hook)
    d = h.shape[-1]
    vectors = paired_svd((h_cf - h).reshape(-1, d), rank)  # every image token of every pair a row
    cos = None
    if keep_causal:
        causal_rows = _paired(data, subset, causal=True)
        h_c = site_tokens(model, data.input_ids, data.pixel_values[causal_rows], batch_size=batch_size,
                          hook_name=hook)  # fmt: skip
        h_c_cf = site_tokens(model, data.input_ids, data.causal[causal_rows], batch_size=batch_size,
                             hook_name=hook)  # fmt: skip
        kept = paired_svd((h_c_cf - h_c).reshape(-1, d), keep_causal)
        vectors, cos = _orthogonal_to(vectors, kept)
    means = torch.cat([h, h_cf]).reshape(-1, d).double().mean(0) @ vectors.T
    source = f"paired-svd-{rank}" + (f"-keep-causal-{keep_causal}" if keep_causal else "")
    return ImageDirections(vectors=vectors.float(), means=means.float(), hook_name=hook, source=source,
                           cos_causal=cos)  # fmt: skip


def _orthogonal_to(vectors: Tensor, kept: Tensor) -> tuple[Tensor, tuple[float, ...]]:
    """Orthonormal rows spanning ``vectors`` with ``span(kept)`` removed (signs kept), and each row's cosine
    with ``span(kept)`` before (``kept``: orthonormal rows)."""
    vectors, kept = vectors.double(), kept.double()
    cos = tuple(float(c) for c in (vectors @ kept.T).norm(dim=1))
    rest = vectors - (vectors @ kept.T) @ kept
    q, r = torch.linalg.qr(rest.T)  # [d, k]: Gram-Schmidt in the rows' order
    if (r.diagonal().abs() < 1e-6).any():
        raise ValueError("a spurious image direction lies inside the causal subspace: nothing is left to remove "
                         f"after keeping the object's directions (cosines {[round(c, 4) for c in cos]})")  # fmt: skip
    out = q.T
    signs = torch.sign((out * rest).sum(1))
    return out * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None], cos


@contextmanager
def applying_image_directions(model: Any, directions: ImageDirections) -> Iterator[Any]:
    """Within the block, the bridge's image tokens have their coordinates along the directions at the mean."""

    def edit(act: Tensor, hook: Any) -> Tensor:
        return directions.edit(act)

    with hooked(model, [(directions.hook_name, edit)]):
        yield model


@torch.no_grad()
def image_direction_values(
    model: Any, data: Any, directions: ImageDirections, *, rows: Sequence[int] | Tensor | None = None,
    batch_size: int = 64,
) -> tuple[Float[Tensor, "k n"], Float[Tensor, " n"], Float[Tensor, " n"]]:  # fmt: skip
    """Per pair: each direction's resample effect on the answer margin, the base margin, and the whole swap's effect.

    Row ``i`` of the first tensor is ``m(x | v_i-coordinate from x') - m(x)`` for every pair (fp32, CPU);
    the second is ``m(x)``, the third ``m(x') - m(x)``. Margins as the image scorers compute them
    (answer logit minus the mean other candidate).
    """
    paired = _paired(data, None if rows is None else torch.as_tensor(rows, device="cpu"))
    device = next(model.parameters()).device
    labels = list(data.label_ids)
    values, clean, total = [], [], []
    for start in range(0, paired.numel(), batch_size):
        idx = paired[start : start + batch_size]
        ids = data.input_ids.to(device).expand(idx.numel(), -1)
        pixels, swapped = data.pixel_values[idx].to(device), data.counterfactual[idx].to(device)
        answers = data.labels[idx]
        with capturing(model, [directions.hook_name]) as cache:
            base = candidate_margin(_last(model(ids, pixel_values=pixels)), labels, answers)
            h = cache[directions.hook_name]
            other = candidate_margin(_last(model(ids, pixel_values=swapped)), labels, answers)
            h_cf = cache[directions.hook_name]
        diff = h_cf.float() - h.float()
        rows_of_batch = []
        for v in directions.vectors.to(device=device, dtype=torch.float32):

            def resample(act: Tensor, hook: Any, v: Tensor = v, diff: Tensor = diff) -> Tensor:
                return (act.float() + (diff @ v)[..., None] * v).to(act.dtype)

            with hooked(model, [(directions.hook_name, resample)]):
                patched = candidate_margin(_last(model(ids, pixel_values=pixels)), labels, answers)
            rows_of_batch.append((patched - base).cpu())
        values.append(torch.stack(rows_of_batch))
        clean.append(base.cpu())
        total.append((other - base).cpu())
    return torch.cat(values, 1), torch.cat(clean), torch.cat(total)


def image_direction_effects(
    model: Any, data: Any, directions: ImageDirections, *, rows: Sequence[int] | Tensor | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:  # fmt: skip
    """Each direction's resample effect on the answer margin, beside the whole image's (``total``).

    One row per direction: ``effect`` = mean over the pairs of ``m(x | v-coordinate from x')
    - m(x)``, ``total`` = mean ``m(x') - m(x)``, ``share = effect / total``.
    """
    values, _, whole = image_direction_values(model, data, directions, rows=rows, batch_size=batch_size)
    effects = values.double().mean(1).tolist()
    total = float(whole.double().mean())
    return pd.DataFrame({
        "hook_name": directions.hook_name, "index": range(directions.rank), "effect": effects,
        "abs_effect": [abs(e) for e in effects], "total": total,
        "share": [e / total if total else float("nan") for e in effects], "n_pairs": values.shape[1],
    })  # fmt: skip


def image_direction_scores(
    model: Any, data: Any, directions: ImageDirections, *, rows: Sequence[int] | Tensor | None = None,
    batch_size: int = 64, n_boot: int = 200, seed: int = 0,
) -> Any:  # fmt: skip
    """The directions as rows of a ``ScoreTable`` (``kind = image_direction``, ``index`` = the direction).

    Scores are the mean absolute resample effect over the pairs with a bootstrap interval, as
    :func:`icp_lens.scoring.image_scores.score_image_units` scores units, so both can share a table.
    """
    from icp_lens.features import Feature
    from icp_lens.scoring.effects import Effects
    from icp_lens.scoring.table import ScoreTable

    values, clean, _ = image_direction_values(model, data, directions, rows=rows, batch_size=batch_size)
    features = tuple(Feature("image_direction", 0, i) for i in range(directions.rank))
    effects = Effects(features, "resample", values, clean, exact=True, metric="candidate_margin")
    table = ScoreTable.from_effects([effects], n_boot=n_boot, seed=seed)
    table.frame["hook_name"] = directions.hook_name  # where they were fitted (the kind's template names the projector)
    return table


def sidecar_path(table_path: str | Path) -> Path:
    """``scores.csv`` -> ``scores.image_directions.safetensors`` (beside the table)."""
    path = Path(table_path)
    return path.with_name(f"{path.stem}.image_directions.safetensors")


def save_image_directions(directions: ImageDirections, path: str | Path) -> Path:
    """Write the vectors and means as safetensors (atomically), with the hook and source in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"vectors": directions.vectors.float().contiguous(), "means": directions.means.float().contiguous()}
    meta = {"format": _FORMAT, "hook_name": directions.hook_name, "source": directions.source}
    if directions.cos_causal is not None:
        meta["cos_causal"] = json.dumps(list(directions.cos_causal))
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_image_directions(path: str | Path) -> ImageDirections:
    """Read what :func:`save_image_directions` wrote (safetensors only: nothing is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image directions at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an icp_lens image-directions file (format {meta.get('format')!r})")
        vectors, means = f.get_tensor("vectors"), f.get_tensor("means")
    cos = tuple(json.loads(meta["cos_causal"])) if "cos_causal" in meta else None
    return ImageDirections(
        vectors, means, hook_name=meta.get("hook_name", PROJECTOR_HOOK), source=meta.get("source", ""), cos_causal=cos
    )


def _last(out: Any) -> Tensor:
    return (out.logits if hasattr(out, "logits") else out)[:, -1]


_FOLD_NAMES = ("projector_linear", "vision_embeddings", "fold_image_directions", "ImageDirectionExport",
               "export_image_directions")  # fmt: skip
__all__ += list(_FOLD_NAMES)


def __getattr__(name: str) -> Any:
    """The fold into the weights lives in :mod:`icp_lens.directions.image_fold`; its names stay importable here
    (resolved on first use, so either module may be imported first)."""
    if name in _FOLD_NAMES:
        from icp_lens.directions import image_fold

        return getattr(image_fold, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The data of the multimodal trainer, and how a model's answers on it are read.

:class:`MultimodalData` holds image probes as tensors (one shared prompt, images, labels,
their spurious and causal counterfactual images); :func:`data_from_probes` reads a probe
file into it through the model's own processor; :func:`predict_classes` is the answer a
model (HF or a ``TransformerBridge`` on it) picks for each row, and
:func:`counterfactual_accuracy` the label-free measure the trainer selects checkpoints by.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["MultimodalData", "data_from_probes", "predict_classes", "counterfactual_accuracy"]


@dataclass(frozen=True)
class MultimodalData:
    """Training rows: one prompt (token ids shared by every row), images, labels.

    ``label_ids`` are the vocabulary ids of the answer words (class ``k`` is
    ``label_ids[k]``); ``counterfactual`` holds each row's spurious counterfactual image
    where ``has_counterfactual`` is true; ``causal`` each row's causal counterfactual image
    (the other object, same background) where ``has_causal`` is true (read by the image
    directions' fit only); ``groups`` (``-1``: none) is read by GroupDRO only.
    """

    input_ids: Int[Tensor, " pos"]
    pixel_values: Float[Tensor, "n 3 h w"]
    labels: Int[Tensor, " n"]
    label_ids: tuple[int, ...]
    counterfactual: Float[Tensor, "n 3 h w"] | None = None
    has_counterfactual: torch.Tensor | None = None
    groups: Int[Tensor, " n"] | None = None
    causal: Float[Tensor, "n 3 h w"] | None = None
    has_causal: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.pixel_values.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"{n} images but labels of shape {tuple(self.labels.shape)}")
        for images in (self.counterfactual, self.causal):
            if images is not None and images.shape != self.pixel_values.shape:
                raise ValueError("counterfactual images must have the images' shape")
        if self.groups is not None and self.groups.shape != (n,):
            raise ValueError(f"{n} images but groups of shape {tuple(self.groups.shape)}")


def data_from_probes(
    path: str | Path, processor: Any, *, chunk: int = 512, rows: list[Any] | None = None, causal: bool = False
) -> MultimodalData:
    """Read an image probe file into :class:`MultimodalData` through the model's own processor.

    Every row must carry an ``image`` and the same prompt text; the classes are the
    answer words (answers and alternatives, sorted), each a single token; rows with an
    ``image_counterfactual`` get it as their spurious counterfactual; ``group`` strings
    become group ids (``-1`` where a row has none). ``rows``: the file's examples when the
    caller has read them already (image paths are still resolved against ``path``). With
    ``causal``, rows with an ``image_causal_counterfactual`` get it too (``causal``/``has_causal``).
    """
    from PIL import Image

    from icp_lens.probes import image_file, read_probes, single_token_id

    rows = read_probes(path) if rows is None else list(rows)
    prompts = {ex.prompt for ex in rows}
    if len(prompts) != 1:
        raise ValueError(f"{path}: the multimodal trainer takes one prompt shared by every row, found {len(prompts)}")
    if any(ex.image is None for ex in rows):
        raise ValueError(f"{path}: every row needs an 'image' for the multimodal trainer")
    words = sorted({w for ex in rows for w in (ex.answer, *ex.alternatives)})
    label_ids = tuple(single_token_id(processor.tokenizer, w) for w in words)
    prompt = rows[0].prompt

    def pixels(field: str, subset: list[int]) -> Tensor:
        out = []
        for start in range(0, len(subset), chunk):
            part = subset[start : start + chunk]
            images = []
            for i in part:
                with Image.open(image_file(path, rows[i], field)) as img:
                    images.append(img.convert("RGB"))
            out.append(processor(images=images, text=[prompt] * len(part), return_tensors="pt")["pixel_values"])
        return torch.cat(out)

    every = list(range(len(rows)))
    with Image.open(image_file(path, rows[0])) as img:  # the image's size sets the number of image tokens
        first = processor(images=[img.convert("RGB")], text=[prompt], return_tensors="pt")
    images = pixels("image", every)

    def optional(field: str) -> tuple[Tensor | None, Tensor | None]:
        has = torch.tensor([getattr(ex, field) is not None for ex in rows], device="cpu")
        if not bool(has.any()):
            return None, None
        out = torch.zeros_like(images)
        out[has] = pixels(field, has.nonzero().flatten().tolist())
        return out, has

    counterfactual, has_cf = optional("image_counterfactual")
    causal_images, has_causal = optional("image_causal_counterfactual") if causal else (None, None)
    names = sorted({ex.group for ex in rows if ex.group is not None})
    groups = torch.tensor([names.index(ex.group) if ex.group is not None else -1 for ex in rows], device="cpu")
    return MultimodalData(
        input_ids=first["input_ids"][0], pixel_values=images,
        labels=torch.tensor([words.index(ex.answer) for ex in rows], device="cpu"), label_ids=label_ids,
        counterfactual=counterfactual, has_counterfactual=has_cf, groups=groups if names else None,
        causal=causal_images, has_causal=has_causal,
    )  # fmt: skip


@torch.no_grad()
def predict_classes(model: Any, data: MultimodalData, *, counterfactual: bool = False, batch: int = 500) -> Tensor:
    """The class index the model picks for each row (on the counterfactual images if asked).

    ``model`` is the HF model or a ``TransformerBridge`` on it (hooks of the bridge apply).
    """
    images = data.counterfactual if counterfactual else data.pixel_values
    if images is None:
        raise ValueError("these data have no counterfactual images")
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch):
        pixels = images[start : start + batch].to(device)
        result = model(data.input_ids.to(device).expand(pixels.shape[0], -1), pixel_values=pixels)
        logits = (result.logits if hasattr(result, "logits") else result)[:, -1, list(data.label_ids)]
        out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def counterfactual_accuracy(model: Any, data: MultimodalData, *, batch: int = 500) -> float:
    """The share of rows with a spurious counterfactual image answered right both on the image and on
    its counterfactual: a label-free (no group labels) measure of a shortcut's hold."""
    if data.counterfactual is None or data.has_counterfactual is None or not bool(data.has_counterfactual.any()):
        raise ValueError("counterfactual accuracy needs rows with a spurious counterfactual image")
    rows = data.has_counterfactual
    right = predict_classes(model, data, batch=batch)[rows] == data.labels[rows]
    right_cf = predict_classes(model, data, counterfactual=True, batch=batch)[rows] == data.labels[rows]
    return float((right & right_cf).float().mean())

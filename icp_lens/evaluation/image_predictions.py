"""Predictions of a vision-language model on image probes, for the evaluation report.

``predict_image_examples(model, processor, path)`` runs an HF vision-language model
(``model(input_ids=..., pixel_values=...)``, e.g. ``LlavaForConditionalGeneration``) on
each row's ``image`` and, where it has one, its ``image_counterfactual``, and returns
the :class:`~icp_lens.evaluation.predictions.Predictions` that
:func:`~icp_lens.evaluation.report.evaluate_predictions` turns into the usual report
(accuracy, worst group, flip rate under the spurious counterfactual, ECE, ...). In the
returned examples a row with an image counterfactual has ``spurious_counterfactual``
set to its own prompt (the text does not change; the image does), so every metric that
reads spurious counterfactuals applies unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icp_lens.evaluation.predictions import Predictions
from icp_lens.probes import ProbeExample, read_probes, single_token_id

__all__ = ["predict_image_examples"]


@torch.no_grad()
def _candidate_logits(model: Any, ids: torch.Tensor, images: torch.Tensor, vocab: list[int], batch: int) -> np.ndarray:
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch):
        pixels = images[start : start + batch].to(device)
        logits = model(input_ids=ids.to(device).expand(pixels.shape[0], -1), pixel_values=pixels).logits
        out.append(logits[:, -1, vocab].float().cpu().numpy())
    return np.concatenate(out)


def predict_image_examples(model: Any, processor: Any, path: str | Path, *, batch_size: int = 256) -> Predictions:
    """Candidate logits of every row of an image probe file (and of its image counterfactual)."""
    from icp_lens.training.multimodal import data_from_probes

    rows: list[ProbeExample] = read_probes(path)
    data = data_from_probes(path, processor, rows=rows)  # the file is read (and its images checked) once
    words = sorted({w for ex in rows for w in (ex.answer, *ex.alternatives)})
    vocab = [single_token_id(processor.tokenizer, w) for w in words]
    clean = _candidate_logits(model, data.input_ids, data.pixel_values, vocab, batch_size)
    swapped = None
    if data.counterfactual is not None:
        swapped = _candidate_logits(model, data.input_ids, data.counterfactual, vocab, batch_size)
    examples, logits, spurious = [], [], []
    for i, ex in enumerate(rows):
        order = [words.index(c) for c in (ex.answer, *ex.alternatives)]
        has_cf = ex.image_counterfactual is not None
        examples.append(dataclasses.replace(ex, spurious_counterfactual=ex.prompt) if has_cf else ex)
        logits.append(clean[i, order])
        spurious.append(swapped[i, order] if has_cf and swapped is not None else None)
    return Predictions(tuple(examples), tuple(logits), tuple(spurious), tuple(None for _ in rows))

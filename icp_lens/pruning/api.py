"""The pruner end to end: features -> PrunePlan -> edited, exported, verified checkpoint.

>>> plan = make_plan(bridge, table.select(top_k=4), mode="mean", reference=probes)
>>> result = apply_plan(bridge, plan, "debiased/")          # writes and verifies
>>> print(result.verification)                              # max |logit diff| 3e-07: PASS
>>> AutoModelForCausalLM.from_pretrained("debiased/")       # plain transformers

``prune(model, scores, out, top_k=...)`` does selection, plan and export in one call.

Token-embedding features go into the same plan (``icp_lens.scoring.score_tokens`` finds
them)::

>>> plan = make_plan(bridge, [], tokens=token_table.icp_selection(), token_mode="mean", reference=probes)
>>> apply_plan(bridge, plan, "debiased/")   # rows replaced, lm_head untied, verified
The model can be a ``TransformerBridge``, an HF model or an HF checkpoint directory;
for a ``HookedTransformer`` (TransformerLens 3.x), make the plan on it with
``hf=<the HF checkpoint it came from>`` and apply the plan to that checkpoint.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from icp_lens.devices import input_device, resolve_device, resolve_dtype
from icp_lens.features import Feature
from icp_lens.pruning.arch import site_of
from icp_lens.pruning.export import check_target, export_checkpoint
from icp_lens.pruning.hf_edit import EditStats, apply_plan_to_model
from icp_lens.pruning.means import feature_means, reference_texts
from icp_lens.pruning.plan import PruneMode, PrunePlan, TokenRow, fingerprint, provenance, reference_record
from icp_lens.pruning.select import select_features
from icp_lens.pruning.source import clean_hf_model, load_tokenizer
from icp_lens.pruning.tokens import check_plain_lookup, embedding_mean, resolve_tokens
from icp_lens.pruning.verify import VerificationReport, verification_batches, verify_export, write_report

__all__ = ["make_plan", "apply_plan", "prune", "PruneResult", "HOOKED_TYPES"]

# model types verified against icp_lens hook ablation on a TransformerBridge when given as a directory
HOOKED_TYPES = ("gpt2", "llama", "gpt_neox", "mistral", "qwen2", "qwen3")


def _is_hooked(model: Any) -> bool:
    return hasattr(model, "hook_dict")


def _tokenizer_or_none(source: Any, *, required: bool) -> Any:
    """The source's tokenizer; ``None`` where it has none and none is required (token names only)."""
    try:
        return load_tokenizer(source)
    except (OSError, ValueError):
        if required:
            raise
        return None


def make_plan(
    model: Any,
    features: Sequence[Feature | str],
    *,
    mode: PruneMode = "zero",
    reference: Any = None,
    hf: Any = None,
    tokenizer: Any = None,
    description: str | None = None,
    batch_size: int = 32,
    tokens: Sequence[int | str] = (),
    token_mode: PruneMode = "zero",
    directions: Any = None,
    direction_mode: str = "mean",
    device: Any = None,
    **provenance_fields: Any,
) -> PrunePlan:
    """A plan to remove ``features`` (and token-embedding ``tokens``) from ``model``.

    ``reference`` (prompts, ProbeExamples, a ProbeSet or a JSONL path) is required in
    mean mode: the means are taken over it, on ``model`` (at hook points when it is a
    hooked model). ``hf`` is the HF checkpoint (directory or model) the plan is for,
    needed when ``model`` is a ``HookedTransformer``; load that one *without* weight
    processing (``HookedTransformer.from_pretrained_no_processing`` or
    ``icp_lens.legacy.hooked_transformer_from_hf``): ``fold_value_biases`` moves the value
    bias out of ``hook_z``, so a head's activation there is no longer the input of the HF
    output projection (verification would then fail). Extra keyword arguments (e.g.
    ``scores="scores.csv", top_k=4``) are recorded as provenance.

    ``tokens`` (ids, or vocabulary strings as the tokenizer spells them) are
    token-embedding features: their input-embedding rows are set to zero
    (``token_mode="zero"``) or to the mean input embedding over ``reference``
    (``token_mode="mean"``); ``mode`` applies to ``features`` only.

    ``directions`` (an ``icp_lens.directions.DirectionSet``, e.g. ``table.directions`` or a
    subset of it) are removed in ``direction_mode`` (``mean`` or ``project``); their means
    were fixed when they were fitted, and the export folds them into the weights.

    ``device`` (``"cuda"``, ``"cuda:1"``, a ``torch.device``; default: where the weights
    are, the CPU for a directory) is where the mean-mode forward passes run.
    """
    feats = tuple(Feature.parse(f) if isinstance(f, str) else f for f in features)
    if any(f.kind in ("direction", "token") for f in feats):
        raise ValueError("Pass direction features as directions=<DirectionSet> and token features as tokens=[ids]")
    if token_mode not in ("zero", "mean"):
        raise ValueError(f"Unknown token mode {token_mode!r}; valid: ['zero', 'mean']")
    clean = clean_hf_model(hf if hf is not None else model)
    for f in feats:
        site_of(clean, f.kind, f.layer, f.index)  # raises on features the model lacks
    if directions is not None:
        from icp_lens.directions.fold import check_foldable

        check_foldable(clean)
        if len(directions) == 0:
            directions = None
    tok = tokenizer
    if tok is None and (mode == "mean" or tokens):
        tok = _tokenizer_or_none(hf if hf is not None else model, required=mode == "mean" or token_mode == "mean")
    token_ids = resolve_tokens(clean, list(tokens), tok) if tokens else []
    if token_ids:
        check_plain_lookup(clean)
    means = record = None
    texts: list[str] | None = None
    if (mode == "mean" and feats) or (token_ids and token_mode == "mean"):
        if reference is None:
            raise ValueError("Mean mode needs reference=... (the prompts to average each feature over)")
        texts = reference_texts(reference)
        if description is None and isinstance(reference, (str, Path)):
            description = str(reference)
        record = reference_record(texts, description)
    fp = fingerprint(clean)  # before the move below: .to() moves `clean` in place, the digest is of the CPU weights
    source = model if _is_hooked(model) else (clean if device is None else clean.to(resolve_device(device)))
    if mode == "mean":
        table = feature_means(source, feats, texts, tokenizer=tok, batch_size=batch_size) if feats else {}
        means = tuple(table[f] for f in feats)
    value = None
    if token_ids and token_mode == "mean":
        value = tuple(embedding_mean(source, texts, tokenizer=tok, batch_size=batch_size).double().tolist())
    names = tok.convert_ids_to_tokens(token_ids) if tok is not None and token_ids else [None] * len(token_ids)
    return PrunePlan(
        features=feats,
        mode=mode,
        fingerprint=fp,
        means=means,
        reference=record,
        provenance=provenance(**provenance_fields),
        tokens=tuple(TokenRow(t, value, name) for t, name in zip(token_ids, names, strict=True)),
        directions=directions,
        direction_mode=direction_mode,
    )


@dataclass(frozen=True)
class PruneResult:
    """Where the checkpoint went, what was edited, and how well it matches the hooks."""

    out: Path
    plan: PrunePlan
    stats: EditStats
    verification: VerificationReport | None
    export_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "mode": self.plan.mode,
            "n_features": len(self.plan.features),
            "features": [str(f) for f in self.plan.features],
            "tokens": [str(t) for t in self.plan.tokens],
            "directions": [] if self.plan.directions is None else [str(f) for f in self.plan.directions.features],
            "changed_parameters": self.stats.changed,
            "untied_unembedding": self.stats.untied,
            "zeroed_fraction": self.stats.zeroed_fraction,
            "biases_added": list(self.stats.biases_added),
            "export_seconds": self.export_seconds,
            "verification": None if self.verification is None else self.verification.to_dict(),
        }


def _hooked_for(model: Any, device: Any = None) -> Any:
    """The hooked model to check the export against: ``model`` itself, or a bridge booted on a directory."""
    if _is_hooked(model):
        return model
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        if AutoConfig.from_pretrained(model).model_type in HOOKED_TYPES:
            from icp_lens.model import boot_bridge

            return boot_bridge(model, device=device)
    return None


def apply_plan(
    model: Any,
    plan: PrunePlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    verify: bool = True,
    prompts: Sequence[str] | None = None,
    tokenizer: Any = None,
    tolerance: float = 1e-5,
    reference: Any = None,
    save_dtype: Any = None,
    device: Any = None,
) -> PruneResult:
    """Edit a clean copy of ``model`` per ``plan``, export it to ``out``, and verify it.

    Verification (default on) reloads ``out`` with ``transformers`` alone and compares
    its logits on ``prompts`` (random token ids when none) with the original model
    ablated at run time: by module hooks on the HF model, and by icp_lens hooks on a
    hooked model (``model`` itself when it is a bridge or HookedTransformer, a bridge
    booted on a directory, or ``reference``); see ``VerificationReport``. ``save_dtype``
    (``"bfloat16"``, ``"float16"``) writes the verified weights in that dtype.

    ``device`` is where the verification's forward passes run (the exported checkpoint,
    the unedited original and the hooked model go there; default: the CPU for a
    directory, else where ``model`` is). The edit itself is folded on the CPU in float64
    and written from there, whatever the device: it is a few matrix products, exact
    there, and float64 is missing on some accelerators (MPS).
    """
    out = check_target(out, overwrite=overwrite, source=model)
    where = resolve_device(device) if device is not None else None
    if where is None and isinstance(model, nn.Module):  # an in-memory model: verify where it is
        where = input_device(model)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    clean: nn.Module = clean_hf_model(model).cpu()
    plan.check(clean)
    tok = tokenizer if tokenizer is not None else load_tokenizer(model)
    hooked = batches = latency = None
    original = clean
    if verify:
        hooked = reference if reference is not None else _hooked_for(model, where)
        batches = verification_batches(hooked if hooked is not None else clean, prompts=prompts, tokenizer=tok)
        latency = 0.0  # asks verify_export to time both models, interleaved, after the export
        original = copy.deepcopy(clean)  # the edit below works in place
        if where is not None:
            original.to(where)
    edited, stats = apply_plan_to_model(clean, plan, check=False)
    reports: list[VerificationReport] = []
    times = {"start": time.perf_counter()}

    def finish(tmp: Path) -> None:  # verified inside the temporary folder: `out` appears complete or not at all
        times["saved"] = time.perf_counter()
        if verify:
            reports.append(verify_export(
                original, plan, tmp, hooked=hooked, batches=batches, tolerance=tolerance,
                zeroed_fraction=stats.zeroed_fraction, latency_before_ms=latency, device=where,
            ))  # fmt: skip
            write_report(tmp, reports[0])

    out = export_checkpoint(edited, out, tokenizer=tok, plan=plan, overwrite=overwrite, finish=finish,
                            save_dtype=None if save_dtype is None else resolve_dtype(save_dtype))  # fmt: skip
    seconds = times["saved"] - times["start"]
    report = reports[0] if reports else None
    return PruneResult(out=out, plan=plan, stats=stats, verification=report, export_seconds=seconds)


def prune(
    model: Any,
    scores: Any,
    out: str | Path,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    per_layer_cap: int | None = None,
    mode: PruneMode = "zero",
    reference: Any = None,
    overwrite: bool = False,
    verify: bool = True,
    prompts: Sequence[str] | None = None,
    tolerance: float = 1e-5,
    kinds: Sequence[str] | None = None,
    min_selectivity: float | None = None,
    min_share: float | None = None,
    token_mode: PruneMode = "zero",
    direction_mode: str = "mean",
    force: bool = False,
    save_dtype: Any = None,
    device: Any = None,
) -> PruneResult:
    """Select from ``scores`` (ScoreTable, frame, path or feature list), plan, export, verify.

    A table that records the model it was scored on (``table.meta``, written by ``icp-lens
    score``) is refused for any other model (``ProvenanceError`` naming what differs)
    unless ``force``.

    ``reference`` feeds the means in mean mode; its prompts are also the verification
    inputs unless ``prompts`` are given. ``kinds`` says which rows compete (default: every
    prunable kind in the table: units, ``direction`` and ``token`` rows); selected direction
    rows take their vectors from the table (``<stem>.directions.safetensors``), token rows
    become token-embedding edits. ``device``: where mean mode's and the verification's
    forward passes run (see :func:`apply_plan`).
    """
    from icp_lens.pruning.select import SELECTABLE_KINDS
    from icp_lens.scoring.table import ScoreTable

    table = ScoreTable.load(scores) if isinstance(scores, (str, Path)) else scores
    meta = getattr(table, "meta", None)
    if meta and "model" in meta:  # the table's model must be this model
        from icp_lens.scoring.provenance import check_model

        name = str(scores) if isinstance(scores, (str, Path)) else "the score table"
        check_model(meta, fingerprint(clean_hf_model(model)), table=name, force=force)
    selected = select_features(
        table, threshold=threshold, top_k=top_k, per_layer_cap=per_layer_cap,
        kinds=tuple(kinds) if kinds is not None else SELECTABLE_KINDS, min_selectivity=min_selectivity,
        min_share=min_share,
    )  # fmt: skip
    if not selected:
        raise ValueError("The selection is empty: no feature passes the threshold / top-k / min-share / selectivity")
    features = [f for f in selected if f.kind not in ("direction", "token")]
    token_ids = [f.index for f in selected if f.kind == "token"]
    picked = [f for f in selected if f.kind == "direction"]
    directions = None
    if picked:
        source = getattr(table, "directions", None)
        if source is None:
            raise ValueError("Direction rows were selected but the table carries no direction vectors")
        directions = source.subset(picked)
    check_target(out, overwrite=overwrite, source=model)
    plan = make_plan(
        model, features, mode=mode, reference=reference, tokens=token_ids, token_mode=token_mode,
        directions=directions, direction_mode=direction_mode,
        scores=scores if isinstance(scores, (str, Path)) else None,
        threshold=threshold, top_k=top_k, per_layer_cap=per_layer_cap, kinds=list(kinds) if kinds else None,
        min_selectivity=min_selectivity, min_share=min_share, device=device,
    )  # fmt: skip
    if prompts is None and reference is not None:
        prompts = reference_texts(reference)
    return apply_plan(model, plan, out, overwrite=overwrite, verify=verify, prompts=prompts, tolerance=tolerance,
                      save_dtype=save_dtype, device=device)  # fmt: skip

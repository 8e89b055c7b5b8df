"""Exact activation patching: ``dP(x, f, I)`` for every feature and probe example.

For each feature ``f`` and probe example ``x`` the model is run with ``f`` replaced by
the intervention's value, and the output property is read at the last position:

    dP(x, f, I) = P(M(x | do(f = I(f)))) - P(M(x))

This is the ground truth the attribution scorer approximates, and naively it costs one
forward pass per (feature, example). ``exact_effects`` computes exactly the same numbers
(to float round-off; tested against one hooked run per feature) with less work:

* **Packing.** ``features_per_pass`` features are patched in one forward pass: the batch
  is repeated once per feature along the batch dimension and each copy patched on its own
  rows (rows of a transformer never interact).
* **Streaming.** Probe examples are processed one batch at a time: a clean pass (the
  baseline ``P(M(x))``), one pass on the batch's counterfactual prompts for ``resample``
  (the values to patch in), then the patched passes. Nothing about the whole set is held
  beyond the ``[n_features, n_examples]`` result.
* **Positions before the first change come from the clean run** (key/value cache). A
  causal model's activations at a position depend only on earlier tokens, so an edit
  changes nothing before the first position it touches. For ``resample`` that is the
  first token where prompt and counterfactual differ (before it, both runs have the same
  activations, so patching them is a no-op); with ``positions``, the first one given; for
  neurons and head outputs of the *last* block, the last position (nothing after them
  reads other positions). The clean run's keys and values of the earlier positions are
  cached (on the bridge, sliced from the clean pass's own cache) and the patched passes
  compute only the rest: for a counterfactual that swaps the second-to-last token, two
  positions instead of the whole prompt. (Off for a right-aligned counterfactual of
  another length and for per-position means.)
* **Blocks before the feature's come from the clean run.** A feature in block ``L``
  changes nothing before block ``L``: the clean pass records ``blocks.L.hook_resid_pre``
  and the patched pass runs blocks ``L..`` only. ``HookedTransformer`` has
  ``start_at_layer=L`` (a residual feature of block ``L`` is then edited in that tensor
  directly, since it is the block's input). A ``TransformerBridge`` has no real
  equivalent (TransformerLens 3.x's refuses ``start_at_layer``, 4.x's still runs blocks
  ``0..L-1`` inside the Hugging Face forward and discards them), so
  ``icp_lens.scoring.prefix.BridgeBlocks`` hands the Hugging Face model's own forward the
  list of blocks ``L..`` and block ``L`` the recorded residual. On the bridge, when the
  edits of block ``L`` are all MLP neurons, block ``L``'s attention sublayer also returns
  its recorded clean output instead of computing it. Features are chunked by block
  (``_plan``), so that a pass rarely carries a feature through blocks before its own.
* **Last position only.** The metric reads the last position, so the unembedding is
  applied there alone: ``HookedTransformer`` stops after the last block
  (``stop_at_layer``) and applies ``ln_final``, ``unembed`` and the output soft cap to the
  last position; the bridge passes ``logits_to_keep=1`` to the Hugging Face model.
* **Only the logits the metric reads** (bridge, ``logit_diff``): the answer and
  alternative tokens' rows of the unembedding (``icp_lens.scoring.prefix.ColumnUnembed``),
  not the whole vocabulary, which on a small model with a large vocabulary costs as much
  as several blocks.

Each shortcut is checked the first time it is used: a pass with no edits must reproduce
the clean full forward pass (to float round-off), otherwise the shortcut to blame is
turned off. A shortcut can cost speed, never correctness. The numbers are the same as
one hooked run per feature to float round-off: exactly the same where no position is
skipped; computing the positions after the first change on their own changes the order
of some sums (SmolLM2-135M: up to about 1e-5 on ``logit_diff``).

Long runs show a progress bar and, with ``checkpoint=path``, save partial results
(safetensors, no pickling) every half minute and when interrupted; calling again with the
same arguments resumes, skipping the (feature chunk, probe batch) passes already done
(``icp_lens.scoring.checkpoint`` describes the file and how other runs are refused).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from icp_lens.devices import input_device
from icp_lens.edits import Edit
from icp_lens.features import Feature, validate_features
from icp_lens.hooks import capturing
from icp_lens.interventions import Intervention, Mean, Resample, Scale, Zero
from icp_lens.metrics import Metric, get_metric, logit_diff
from icp_lens.model import HookedModel, model_dims
from icp_lens.probeset import ProbeSet
from icp_lens.scoring.checkpoint import CheckpointState, run_meta
from icp_lens.scoring.effects import Effects, InterventionSpec, check_batches, probe_means
from icp_lens.scoring.pass_plan import _cf_positions, _first_change, _in_columns, _plan, _tile
from icp_lens.scoring.prefix import padded_columns
from icp_lens.scoring.runner import _Runner

__all__ = ["exact_effects"]

#: what a patched pass costs beyond its rows, in probe-example rows per block it runs (``_plan``): Python and
#: per-call costs are worth a few dozen rows on a CPU; on an accelerator small passes are latency-bound
_PASS_OVERHEAD_ROWS = {"cpu": 32.0}
_PASS_OVERHEAD_ROWS_ACCELERATOR = 4096.0


@torch.no_grad()
def exact_effects(
    model: HookedModel,
    probes: ProbeSet,
    features: Sequence[Feature],
    intervention: InterventionSpec | str = "resample",
    *,
    metric: str | Metric = "logit_diff",
    positions: tuple[int, ...] | None = None,
    batch_size: int = 32,
    features_per_pass: int = 64,
    means: dict[Feature, Mean] | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> Effects:
    """``dP(x, f, I)`` by exact activation patching, for every feature and probe example.

    ``intervention`` is an ``InterventionSpec`` or its label (``"resample"`` from the
    spurious counterfactual, ``"resample_causal"``, ``"zero"``, ``"mean"``,
    ``"scale:ALPHA"``); ``metric`` a metric name or function (``icp_lens.metrics``);
    ``positions`` restricts the intervention to some positions (None: all). Examples
    without the counterfactual a resample needs get ``NaN``. ``means`` overrides the mean
    values (default: ``probe_means`` over the probe prompts). ``batch_size`` probe examples
    times ``features_per_pass`` features are the rows of one forward pass. With
    ``checkpoint`` partial results are saved there and an interrupted run resumes.

    Returns ``Effects`` with ``exact=True``, ``values`` ``[n_features, n_examples]`` in
    probe-set order.
    """
    spec = InterventionSpec.parse(intervention)
    metric_fn = get_metric(metric)
    metric_name = metric if isinstance(metric, str) else getattr(metric_fn, "__name__", "custom")
    features = tuple(features)
    if not features:
        raise ValueError("exact_effects needs at least one feature (e.g. enumerate_features(model, 'neuron'))")
    bad = [f for f in features if not isinstance(f, Feature)]
    if bad:
        raise TypeError(f"features must be Feature objects; got {type(bad[0]).__name__} ({bad[0]!r})")
    dupes = sorted(str(f) for f, n in Counter(features).items() if n > 1)
    if dupes:
        raise ValueError(f"Duplicate features: {dupes[:5]}")
    validate_features(model, features)
    if getattr(model, "training", False):
        raise ValueError("The model is in training mode (dropout is active): call model.eval() before scoring")
    if batch_size < 1 or features_per_pass < 1:
        raise ValueError(f"batch_size and features_per_pass must be >= 1, got {batch_size}, {features_per_pass}")
    batches = list(probes.batches(batch_size, device=input_device(model)))
    positions = check_batches(batches, spec, positions)
    which = spec.counterfactual
    fixed: dict[Feature, Intervention] = {}
    per_position = False
    if spec.kind == "mean":
        means = probe_means(model, probes, features, batch_size=batch_size) if means is None else means
        missing = [str(f) for f in features if f not in means]
        if missing:
            raise KeyError(f"means has no value for {missing[:5]}")
        fixed = {f: means[f] for f in features}
        per_position = any(m.per_position for m in fixed.values())  # positions are absolute: no KV reuse
    elif spec.kind in ("zero", "scale"):
        single: Intervention = Zero() if spec.kind == "zero" else Scale(spec.alpha)
        fixed = {f: single for f in features}

    runner = _Runner(model)
    n_layers = model_dims(model).n_layers
    if runner.on["prefix"]:  # passes skip the blocks before their chunk: chunks by block
        rows = _PASS_OVERHEAD_ROWS.get(input_device(model).type, _PASS_OVERHEAD_ROWS_ACCELERATOR)
        chunks = _plan(features, features_per_pass, n_layers, rows / max(1, min(batch_size, len(probes))))
    else:  # every pass runs every block: as few passes as possible
        chunks = _plan(features, features_per_pass, n_layers, math.inf)
    path = Path(checkpoint) if checkpoint is not None else None
    meta: dict[str, str] = {}
    if path is not None:  # what a resumed run must match (fingerprinting reads every weight: only when needed)
        meta = run_meta(
            model,
            probes,
            features,
            intervention=spec.label,
            metric=metric_name,
            positions=positions,
            batch_size=batch_size,
            features_per_pass=features_per_pass,
            plan=[members for _, members, _ in chunks],
        )
    state = CheckpointState(path, meta, len(features), len(probes), (len(chunks), len(batches)))
    bar = tqdm(
        total=len(chunks) * len(batches),
        initial=int(state.done.sum()),
        disable=not progress,
        desc=f"exact {spec.label}",
        unit="pass",
    )
    fit = features_per_pass  # edit sets per pass known to fit in memory (halved on out-of-memory)
    try:
        for b, batch in enumerate(batches):
            todo = [c for c in range(len(chunks)) if not state.done[c, b]]
            if not todo and state.clean_done[b]:
                continue
            rows, seq = batch.index.cpu(), batch.tokens.shape[1]
            cf = getattr(batch, which) if which is not None else None
            defined = which is None or cf is not None
            align, base_positions = "exact", positions
            firsts = dict.fromkeys(todo, 0)
            if cf is not None and cf.shape[1] != seq:  # right-aligned counterfactual: every position
                align, base_positions = "right", _cf_positions(positions, seq, cf.shape[1])
                defined = base_positions != ()
            elif defined and not per_position:  # per-position means address absolute positions
                firsts = {c: _first_change(batch.tokens, cf, positions, chunks[c][2]) for c in todo}
            uses = {(chunks[c][0], firsts[c]) for c in todo if defined and firsts[c] < seq}
            columns = None
            if metric_fn is logit_diff and runner.unembed is not None:  # it reads the answer and alternatives only
                read = torch.cat([batch.answer[:, None], batch.alternatives], 1)
                columns = padded_columns(read, runner.unembed.linear.out_features)
            ctx = runner.clean(batch.tokens, uses, min(features_per_pass, len(features)) * batch.size, columns)
            clean_metric = metric_fn(ctx.last, batch, ctx.last).float().cpu()
            state.clean[rows] = clean_metric
            state.clean_done[b] = True
            sources: dict[str, Tensor] = {}
            if cf is not None and uses:
                names = sorted({features[i].hook_name for c in todo for i in chunks[c][1]})
                with capturing(model, names) as store:
                    model(cf)
                sources = dict(store)
            for c in todo:
                layer, members, _ = chunks[c]
                index = torch.tensor(members, device="cpu")[:, None], rows[None, :]  # state's rows (CPU)
                if defined and firsts[c] >= seq:  # the intervention cannot reach the metric: dP = 0 exactly
                    state.values[index] = 0.0
                elif defined:
                    start = ctx.start_for(firsts[c])  # the pass computes positions start.. only
                    patch_positions = base_positions
                    if start > 0 and positions is not None:
                        patch_positions = tuple(p % seq - start for p in positions if p % seq >= start)
                    elif start > 0:
                        patch_positions = None
                    groups = []
                    for i in members:
                        f = features[i]
                        act = fixed[f] if which is None else Resample(f.select(sources[f.hook_name])[:, start:], align)
                        groups.append([Edit(f, act, positions=patch_positions)])
                    last, fit = _patched_within_memory(runner, ctx, layer, start, groups, fit)
                    k = len(members)
                    read, clean_last = batch, ctx.last
                    if runner.uses_columns(ctx):  # logits of ctx.columns: the metric reads them by column
                        read, clean_last = _in_columns(batch, ctx.columns), ctx.last[:, ctx.columns]
                    patched = metric_fn(last, _tile(read, k), clean_last.repeat(k, 1)).float().cpu().view(k, -1)
                    state.values[index] = patched - clean_metric
                state.done[c, b] = True
                bar.update(1)
                state.save()
    finally:
        bar.close()
        state.save(force=True)
    return Effects(features, spec.label, state.values.clone(), state.clean.clone(), exact=True, metric=metric_name)


def _patched_within_memory(
    runner: _Runner, ctx: Any, layer: int, start: int, groups: list[list[Edit]], fit: int
) -> tuple[Tensor, int]:
    """``runner.patched`` on ``groups``, in passes of at most ``fit`` edit sets; ``(logits, fit)``.

    On out-of-memory (a GPU's, or the CPU allocator's) the pass is retried in halves, down
    to one edit set per pass, and the smaller size is kept for the passes that follow, so a
    sweep finds the largest pass that fits without losing finished work (completed passes
    are in the checkpoint state already). One edit set that does not fit re-raises: the
    probe batch itself is too large (``--batch-size``).
    """
    parts = []
    i = 0
    while i < len(groups):
        size = min(fit, len(groups) - i)
        try:
            parts.append(runner.patched(ctx, layer, start, groups[i : i + size]))
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            fit = max(1, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += size
    return (parts[0] if len(parts) == 1 else torch.cat(parts, 0)), fit

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
  cached and the patched passes compute only the rest: for a counterfactual that swaps
  the second-to-last token, two positions instead of the whole prompt. (Off for a
  right-aligned counterfactual of another length and for per-position means.)
* **Layer prefix** (``HookedTransformer`` only). A feature in block ``L`` changes nothing
  before block ``L``: the clean pass records ``blocks.L.hook_resid_pre`` and the patched
  pass runs blocks ``L..`` only (``start_at_layer=L``); a residual feature of block ``L``
  is edited in that tensor directly, since it is the block's input. ``TransformerBridge``
  cannot skip blocks: TransformerLens 3.x's bridge refuses ``start_at_layer`` and 4.x's
  still runs blocks ``0..L-1`` inside the Hugging Face forward (and discards them), which
  gives identical numbers at no saving, so the bridge runs every block.
* **Last position only.** The metric reads the last position, so the unembedding is
  applied there alone: ``HookedTransformer`` stops after the last block
  (``stop_at_layer``) and applies ``ln_final``, ``unembed`` and the output soft cap to the
  last position; the bridge passes ``logits_to_keep=1`` to the Hugging Face model.

Each shortcut is checked the first time it is used: a pass with no edits must reproduce
the clean full forward pass (to float round-off), otherwise the model falls back to full
passes. A shortcut can cost speed, never correctness.

Long runs show a progress bar and, with ``checkpoint=path``, save partial results
(safetensors, no pickling) every half minute and when interrupted; calling again with the
same arguments resumes, skipping the (feature chunk, probe batch) passes already done
(``icp_lens.scoring.checkpoint`` describes the file and how other runs are refused).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from icp_lens.edits import Edit, _edit_hook, pack_edits
from icp_lens.features import Feature, feature_count, validate_feature
from icp_lens.hooks import capturing, hooked
from icp_lens.interventions import Intervention, Mean, Resample, Scale, Zero
from icp_lens.metrics import Metric, get_metric
from icp_lens.model import HookedModel, is_bridge, model_dims
from icp_lens.probeset import ProbeBatch, ProbeSet
from icp_lens.scoring.checkpoint import CheckpointState, run_meta
from icp_lens.scoring.effects import Effects, InterventionSpec, check_batches, probe_means

__all__ = ["exact_effects"]

_KV_BUDGET_BYTES = 4 * 2**30  # largest key/value cache copy one patched pass may hold (else: full passes)


def _resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _device(model: HookedModel) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _editing(model: HookedModel, edits: list[Edit]) -> Any:
    """``intervene`` without its per-edit validation (done once for all features up front).

    The interventions here never read another feature (no ``Swap``), so the edit hooks
    need no captured activations.
    """
    groups: dict[str, list[Edit]] = {}
    for edit in edits:
        groups.setdefault(edit.feature.hook_name, []).append(edit)
    return hooked(model, [(name, _edit_hook(name, group, {})) for name, group in groups.items()])


def _validate(model: HookedModel, features: Sequence[Feature]) -> None:
    """``validate_feature`` for many features, reading the model's sizes once."""
    n_layers = model_dims(model).n_layers
    counts = {kind: feature_count(model, kind) for kind in {f.kind for f in features}}
    for f in features:
        if f.layer >= n_layers or f.index >= counts[f.kind]:
            validate_feature(model, f)  # raises with the valid ranges


@dataclass(frozen=True)
class _Clean:
    """One probe batch's clean run, as the patched passes need it."""

    tokens: Tensor  # [batch, pos]
    last: Tensor  # clean last-position logits [batch, vocab]
    resid: dict[int, Tensor]  # blocks.L.hook_resid_pre (HookedTransformer prefix reuse)
    caches: dict[int, Any]  # start -> the clean run's keys/values of positions < start

    def start_for(self, first: int) -> int:
        """The first position a pass computes when edits change nothing before ``first``."""
        return first if first in self.caches else 0


def _kv_cache_class() -> Any:
    try:  # TransformerLens 3.x
        from transformer_lens import TransformerLensKeyValueCache

        return TransformerLensKeyValueCache
    except ImportError:  # TransformerLens 2.x
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache

        return HookedTransformerKeyValueCache


class _Runner:
    """Runs clean and patched passes, taking each shortcut only where it reproduces the clean run.

    Shortcuts (``on``): ``kv`` (positions before ``start`` from the clean run's key/value
    cache), ``prefix`` (HookedTransformer: blocks ``L..`` only) and ``last`` (bridge:
    ``logits_to_keep=1``). The first time a shortcut combination is used, a pass with no
    edits must reproduce the clean logits; otherwise shortcuts are dropped in that order.
    """

    def __init__(self, model: HookedModel) -> None:
        self.model = model
        self.dims = model_dims(model)
        self.bridge = is_bridge(model)
        shortformer = getattr(model.cfg, "positional_embedding_type", None) == "shortformer"
        self.on = {"kv": True, "prefix": not self.bridge and not shortformer, "last": self.bridge}
        self._checked: set[tuple[Any, ...]] = set()

    # -- clean pass and its checks --------------------------------------------------
    def clean(self, tokens: Tensor, uses: set[tuple[int, int]], rows: int) -> _Clean:
        """The clean run of ``tokens``, ready for passes ``(layer, first changed position)`` in ``uses``."""
        layers = sorted({layer for layer, _ in uses})
        names = [_resid_pre(layer) for layer in layers] if self.on["prefix"] else []
        with capturing(self.model, names) as store:
            last = self.model(tokens)[:, -1]
        ctx = _Clean(tokens, last, {layer: store[_resid_pre(layer)] for layer in layers} if names else {}, {})
        for start in sorted({s for _, s in uses if 0 < s < tokens.shape[1]}):
            if not self.on["kv"] or self._cache_bytes(rows, start) > _KV_BUDGET_BYTES:
                continue
            try:
                ctx.caches[start] = self._prefix_cache(tokens[:, :start])
            except Exception:  # noqa: BLE001 - the model has no usable KV cache: compute every position
                self.on["kv"] = False
                ctx.caches.clear()
        for layer, start in sorted(uses):
            ctx = self._verify(ctx, layer, ctx.start_for(start))
        return ctx

    def _cache_bytes(self, rows: int, start: int) -> int:
        d = self.dims
        return rows * start * d.n_layers * 2 * d.n_kv_heads * d.d_head * next(self.model.parameters()).element_size()

    def _prefix_cache(self, tokens: Tensor) -> Any:
        if self.bridge:
            return self.model(tokens, return_type="logits_and_cache")[1]
        cache = _kv_cache_class().init_cache(self.model.cfg, tokens.device, tokens.shape[0])
        self.model(tokens, past_kv_cache=cache)
        return cache

    def _tiled_cache(self, ctx: _Clean, start: int, k: int) -> Any:
        batch, prefix = ctx.tokens.shape[0], ctx.caches[start]
        if self.bridge:  # a fresh copy per pass: the HF forward appends to it
            cache = copy.deepcopy(prefix)
            cache.reorder_cache(torch.arange(batch, device=ctx.tokens.device).repeat(k))
            return cache
        entries = [
            replace(e, past_keys=e.past_keys.repeat(k, 1, 1, 1), past_values=e.past_values.repeat(k, 1, 1, 1))
            for e in prefix.entries
        ]
        cache = replace(prefix, entries=entries, previous_attention_mask=prefix.previous_attention_mask.repeat(k, 1))
        cache.freeze()
        return cache

    def _verify(self, ctx: _Clean, layer: int, start: int) -> _Clean:
        scale = max(1.0, ctx.last.abs().max().item())
        tol = (1e-4 if ctx.last.dtype in (torch.float32, torch.float64) else 2e-2) * scale
        while True:
            key = (layer if self.on["prefix"] else None, start > 0, self.on["prefix"], self.on["last"])
            if key in self._checked or not (start > 0 or self.on["prefix"] or self.on["last"]):
                return ctx
            try:
                out = self.patched(ctx, layer, start, [[]])
                ok = out.shape == ctx.last.shape and (out - ctx.last).abs().max().item() <= tol
            except Exception:  # noqa: BLE001 - a shortcut this model does not support
                ok = False
            if ok:
                self._checked.add(key)
                return ctx
            if start > 0:
                self.on["kv"], ctx, start = False, replace(ctx, caches={}), 0
            else:
                self.on["prefix" if self.on["prefix"] else "last"] = False

    # -- patched passes -------------------------------------------------------------
    def _head(self, final_resid: Tensor) -> Tensor:
        """HookedTransformer's ``ln_final`` + ``unembed`` (+ soft cap), on the last position only."""
        model, cfg = self.model, self.model.cfg
        x = final_resid[:, -1:]
        if getattr(cfg, "normalization_type", None) is not None:
            x = model.ln_final(x)
        logits = model.unembed(x)[:, -1]
        cap = getattr(cfg, "output_logits_soft_cap", 0.0) or 0.0
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def patched(self, ctx: _Clean, layer: int, start: int, groups: list[list[Edit]]) -> Tensor:
        """Last-position logits ``[K * batch, vocab]``: edit set k on rows ``k*batch:(k+1)*batch``.

        The pass computes blocks ``layer..`` (prefix reuse) at positions ``start..`` (``start``
        from ``ctx.start_for``); edits address those positions (position 0 is ``start``).
        """
        k, batch, s = len(groups), ctx.tokens.shape[0], start
        edits = pack_edits(groups, batch)
        if self.on["prefix"]:
            hook = _resid_pre(layer)
            x = ctx.resid[layer][:, s:].repeat(k, 1, 1)
            direct = [e for e in edits if e.feature.hook_name == hook]
            if direct:  # the input of block `layer` is this tensor: edit it here, not by a hook
                x = _edit_hook(hook, direct, {})(x, None)
            kwargs = {"past_kv_cache": self._tiled_cache(ctx, s, k)} if s else {}
            with _editing(self.model, [e for e in edits if e.feature.hook_name != hook]):
                return self._head(self.model(x, start_at_layer=layer, stop_at_layer=self.dims.n_layers, **kwargs))
        kwargs = {("past_key_values" if self.bridge else "past_kv_cache"): self._tiled_cache(ctx, s, k)} if s else {}
        if self.on["last"]:
            kwargs["logits_to_keep"] = 1
        with _editing(self.model, edits):
            return self.model(ctx.tokens[:, s:].repeat(k, 1), **kwargs)[:, -1]


def _tile(batch: ProbeBatch, k: int) -> ProbeBatch:
    """The batch repeated ``k`` times along the batch dimension (what a packed pass computes on)."""

    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))

    return replace(
        batch,
        index=rep(batch.index),
        tokens=rep(batch.tokens),
        answer=rep(batch.answer),
        alternatives=rep(batch.alternatives),
        spurious=rep(batch.spurious),
        causal=rep(batch.causal),
        causal_answer=rep(batch.causal_answer),
        groups=batch.groups * k,
    )


def _last_only(feature: Feature, n_layers: int) -> bool:
    """Whether only the last position of ``feature`` can move the last position's logits.

    Neurons and head outputs of the last block feed only their own position (no later
    attention reads them); value vectors and residual dimensions are read by attention.
    """
    return feature.layer == n_layers - 1 and feature.kind in ("neuron", "head")


def _plan(features: Sequence[Feature], per_pass: int, n_layers: int) -> list[tuple[int, list[int], bool]]:
    """Chunks of at most ``per_pass`` feature indices in layer order: ``(first layer, indices, last_only)``."""
    order = sorted(range(len(features)), key=lambda i: (features[i].layer, _last_only(features[i], n_layers)))
    chunks = [order[s : s + per_pass] for s in range(0, len(order), per_pass)]
    return [(features[c[0]].layer, c, all(_last_only(features[i], n_layers) for i in c)) for c in chunks]


def _cf_positions(positions: tuple[int, ...] | None, seq_len: int, src_len: int) -> tuple[int, ...] | None:
    """Positions to patch when the counterfactual is right-aligned and shorter than the prompt."""
    if src_len >= seq_len:
        return positions
    wanted = range(seq_len) if positions is None else [p % seq_len for p in positions]
    return tuple(p - seq_len for p in wanted if p >= seq_len - src_len)


def _first_change(tokens: Tensor, cf: Tensor | None, positions: tuple[int, ...] | None, last_only: bool = False) -> int:
    """The first position where an intervention can change what the metric reads (``seq_len``: none).

    A resample changes nothing before the first token where prompt and counterfactual
    differ (activations there are equal in both runs); ``last_only`` features matter only
    at the last position; ``positions`` limits it further.
    """
    seq = tokens.shape[1]
    first = seq - 1 if last_only else 0
    if cf is not None:
        changed = (tokens != cf).any(0).nonzero()
        first = max(first, int(changed[0]) if changed.numel() else seq)
    if positions is not None:
        wanted = [p % seq for p in positions if p % seq >= first]
        first = min(wanted) if wanted else seq
    return first


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
    _validate(model, features)
    if getattr(model, "training", False):
        raise ValueError("The model is in training mode (dropout is active): call model.eval() before scoring")
    if batch_size < 1 or features_per_pass < 1:
        raise ValueError(f"batch_size and features_per_pass must be >= 1, got {batch_size}, {features_per_pass}")
    batches = list(probes.batches(batch_size, device=_device(model)))
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

    chunks = _plan(features, features_per_pass, model_dims(model).n_layers)
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
        )
    state = CheckpointState(path, meta, len(features), len(probes), (len(chunks), len(batches)))
    runner = _Runner(model)
    bar = tqdm(
        total=len(chunks) * len(batches),
        initial=int(state.done.sum()),
        disable=not progress,
        desc=f"exact {spec.label}",
        unit="pass",
    )
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
            ctx = runner.clean(batch.tokens, uses, min(features_per_pass, len(features)) * batch.size)
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
                index = torch.tensor(members)[:, None], rows[None, :]
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
                    last = runner.patched(ctx, layer, start, groups)
                    k = len(members)
                    patched = metric_fn(last, _tile(batch, k), ctx.last.repeat(k, 1)).float().cpu().view(k, -1)
                    state.values[index] = patched - clean_metric
                state.done[c, b] = True
                bar.update(1)
                state.save()
    finally:
        bar.close()
        state.save(force=True)
    return Effects(features, spec.label, state.values.clone(), state.clean.clone(), exact=True, metric=metric_name)

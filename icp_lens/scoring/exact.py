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
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from icp_lens.edits import Edit, _edit_hook, pack_edits
from icp_lens.features import Feature, feature_count, validate_feature
from icp_lens.hooks import capturing, hooked
from icp_lens.interventions import Intervention, Mean, Resample, Scale, Zero
from icp_lens.metrics import Metric, get_metric, logit_diff
from icp_lens.model import HookedModel, is_bridge, model_dims
from icp_lens.probeset import ProbeBatch, ProbeSet
from icp_lens.scoring.checkpoint import CheckpointState, run_meta
from icp_lens.scoring.effects import Effects, InterventionSpec, check_batches, probe_means
from icp_lens.scoring.prefix import BridgeBlocks, ColumnUnembed, hf_cache_prefix, padded_columns, tiled_hf_cache

__all__ = ["exact_effects"]

_KV_BUDGET_BYTES = 4 * 2**30  # largest key/value cache copy one patched pass may hold (else: full passes)
#: what a patched pass costs beyond its rows, in probe-example rows per block it runs (``_plan``): Python and
#: per-call costs are worth a few dozen rows on a CPU; on an accelerator small passes are latency-bound
_PASS_OVERHEAD_ROWS = {"cpu": 32.0}
_PASS_OVERHEAD_ROWS_ACCELERATOR = 4096.0


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
    resid: dict[int, Tensor]  # blocks.L.hook_resid_pre of the layers whose passes skip blocks 0..L-1
    caches: dict[int, Any]  # start -> the clean run's keys/values of positions < start
    columns: Tensor | None = None  # the vocabulary entries the metric reads (None: all)
    attn: dict[int, Tensor] = field(default_factory=dict)  # block L's attention output (bridge), [batch, pos, d]

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
    cache), ``prefix`` (blocks ``L..`` only: ``start_at_layer`` on HookedTransformer,
    ``BridgeBlocks.from_layer`` on the bridge), ``attn`` (bridge: block ``L``'s clean
    attention output, when the pass edits no more than block ``L``'s MLP neurons there),
    ``columns`` (bridge: the logits of ``ctx.columns`` only, ``ColumnUnembed``) and
    ``last`` (bridge: ``logits_to_keep=1``). The first time a shortcut combination is used,
    a pass with no edits must reproduce the clean logits. Otherwise the first shortcut of
    ``attn``, ``prefix``, ``columns``, ``kv``, ``last`` that alone is to blame is turned off
    (or, if none alone is, the first of them), and the check repeats.
    """

    def __init__(self, model: HookedModel) -> None:
        self.model = model
        self.dims = model_dims(model)
        self.bridge = is_bridge(model)
        self.blocks = BridgeBlocks.find(model) if self.bridge else None
        self.unembed = ColumnUnembed.find(model) if self.bridge else None
        shortformer = getattr(model.cfg, "positional_embedding_type", None) == "shortformer"
        prefix = self.blocks is not None if self.bridge else not shortformer
        self.on = {"kv": True, "prefix": prefix, "attn": self.blocks is not None}
        self.on.update(columns=self.unembed is not None, last=self.bridge)
        self._checked: set[tuple[Any, ...]] = set()

    def skips(self, layer: int) -> bool:
        """Whether a pass for features of block ``layer`` runs blocks ``layer..`` only."""
        if not self.on["prefix"]:
            return False
        if self.blocks is None:  # HookedTransformer: start_at_layer (also 0: the captured resid)
            return not self.bridge
        return self.blocks.supports(layer)

    def reuses_attention(self, ctx: _Clean, layer: int, edits: Sequence[Edit]) -> bool:
        """Whether block ``layer``'s attention output is the clean one (no edit there before its MLP)."""
        if not (self.on["attn"] and layer in ctx.attn and self.skips(layer)):
            return False
        return all(e.feature.kind == "neuron" for e in edits if e.feature.layer == layer)

    def uses_columns(self, ctx: _Clean) -> bool:
        """Whether passes on ``ctx`` return the logits of ``ctx.columns`` only."""
        return ctx.columns is not None and self.on["columns"]

    # -- clean pass and its checks --------------------------------------------------
    def clean(self, tokens: Tensor, uses: set[tuple[int, int]], rows: int, columns: Tensor | None = None) -> _Clean:
        """The clean run of ``tokens``, ready for passes ``(layer, first changed position)`` in ``uses``.

        ``columns``: the vocabulary entries the metric reads (patched passes may compute only those).
        """
        seq = tokens.shape[1]
        layers = sorted({layer for layer, _ in uses if self.skips(layer)})
        starts = sorted({s for _, s in uses if 0 < s < seq}) if self.on["kv"] else []
        starts = [s for s in starts if self._cache_bytes(rows, s) <= _KV_BUDGET_BYTES]
        full_cache = None
        record = self.blocks.attention_outputs(layers) if self.blocks and self.on["attn"] else nullcontext({})
        with capturing(self.model, [_resid_pre(layer) for layer in layers]) as store, record as attn:
            logits = None
            if self.bridge and starts:  # the clean run's own cache holds every prefix
                try:
                    logits, full_cache = self.model(tokens, return_type="logits_and_cache")
                except Exception:  # noqa: BLE001 - no cache from this bridge: prefixes are run on their own
                    logits, full_cache = None, None
            if logits is None:
                logits = self.model(tokens)
        resid = {layer: store[_resid_pre(layer)] for layer in layers}
        ctx = _Clean(tokens, logits[:, -1], resid, {}, columns, dict(attn))
        for start in starts:
            try:
                cache = hf_cache_prefix(full_cache, start, seq) if full_cache is not None else None
                ctx.caches[start] = cache if cache is not None else self._prefix_cache(tokens[:, :start])
            except Exception:  # noqa: BLE001 - the model has no usable KV cache: compute every position
                self.on["kv"] = False
                ctx.caches.clear()
                break
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

    def _tiled_cache(self, ctx: _Clean, start: int, k: int, first_layer: int = 0) -> Any:
        """The clean prefix cache of ``ctx``'s rows (the first ``ctx.tokens.shape[0]`` of the cache's), ``k`` times."""
        batch, prefix = ctx.tokens.shape[0], ctx.caches[start]
        if self.bridge:  # a fresh copy per pass: the HF forward appends to it
            return tiled_hf_cache(prefix, k, batch, first_layer)
        index = torch.arange(batch, device=ctx.tokens.device).repeat(k)
        entries = [replace(e, past_keys=e.past_keys[index], past_values=e.past_values[index]) for e in prefix.entries]
        cache = replace(prefix, entries=entries, previous_attention_mask=prefix.previous_attention_mask[index])
        cache.freeze()
        return cache

    def _verify(self, ctx: _Clean, layer: int, start: int) -> _Clean:
        """Take the shortcuts for ``(layer, start)`` only where a pass with no edits reproduces the clean logits.

        Both kinds of pass at ``layer`` are checked (with and without the clean attention
        output of block ``layer``). The check runs the first example twice (two packed
        copies), which exercises the packing of caches and residuals at the cost of two rows.
        """
        for attn in (True, False):
            ctx = self._verify_one(ctx, layer, start, attn)
        return ctx

    def _verify_one(self, ctx: _Clean, layer: int, start: int, attn: bool) -> _Clean:
        while True:
            skips, columns = self.skips(layer), self.uses_columns(ctx)
            reuse = attn and self.reuses_attention(ctx, layer, [])
            if attn and not reuse:
                return ctx
            key = (layer if skips else None, start > 0, skips, reuse, columns, self.on["last"])
            if key in self._checked or not (start > 0 or skips or columns or self.on["last"]):
                return ctx
            if self._reproduces(ctx, layer, start, reuse):
                self._checked.add(key)
                return ctx
            # find the shortcut to blame: the first that, turned off alone, gives the clean logits
            active = [name for name, used in (("attn", reuse), ("prefix", skips), ("columns", columns),
                      ("kv", start > 0), ("last", self.on["last"])) if used]  # fmt: skip
            for name in active:
                self.on[name] = False
                without = replace(ctx, caches={}) if name == "kv" else ctx
                s = 0 if name == "kv" else start
                if self._reproduces(without, layer, s, attn and self.reuses_attention(without, layer, [])):
                    break
                self.on[name] = True
            else:  # no single one: drop the first, and look again
                self.on[active[0]] = False
            if not self.on["kv"]:
                ctx, start = replace(ctx, caches={}), 0

    def _reproduces(self, ctx: _Clean, layer: int, start: int, attn: bool) -> bool:
        """Whether a pass with no edits on the first example (twice: two packed copies) gives its clean logits."""
        one = replace(
            ctx,
            tokens=ctx.tokens[:1],
            last=ctx.last[:1],
            resid={k: v[:1] for k, v in ctx.resid.items()},
            attn={k: v[:1] for k, v in ctx.attn.items()},
        )
        want = (one.last[:, ctx.columns] if self.uses_columns(ctx) else one.last).expand(2, -1)
        tol = (1e-4 if want.dtype in (torch.float32, torch.float64) else 2e-2) * max(1.0, want.abs().max().item())
        try:
            out = self.patched(one, layer, start, [[], []], attn=attn)
        except Exception:  # noqa: BLE001 - a shortcut this model does not support
            return False
        return out.shape == want.shape and (out - want).abs().max().item() <= tol

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

    def patched(
        self, ctx: _Clean, layer: int, start: int, groups: list[list[Edit]], attn: bool | None = None
    ) -> Tensor:
        """Last-position logits ``[K * batch, vocab]``: edit set k on rows ``k*batch:(k+1)*batch``.

        The pass computes blocks ``layer..`` (prefix reuse) at positions ``start..`` (``start``
        from ``ctx.start_for``); edits address those positions (position 0 is ``start``).
        With ``uses_columns(ctx)`` the logits are those of ``ctx.columns`` only. ``attn``:
        whether block ``layer`` takes its clean attention output (None: where the edits allow).
        """
        k, batch, s = len(groups), ctx.tokens.shape[0], start
        edits = pack_edits(groups, batch)
        if self.bridge and self.skips(layer):  # blocks layer.. on the clean resid; its hook_resid_pre fires
            assert self.blocks is not None
            attn = self.reuses_attention(ctx, layer, edits) if attn is None else attn
            attn_out = ctx.attn[layer][:, s:].repeat(k, 1, 1) if attn else None
            # without the attention of block `layer`, its cache entry is not read either
            kwargs = {"past_key_values": self._tiled_cache(ctx, s, k, layer + 1 if attn else layer)} if s else {}
            resid = ctx.resid[layer][:, s:].repeat(k, 1, 1)
            with self.blocks.from_layer(layer, resid, attn_out), _editing(self.model, edits):
                return self._bridge_logits(ctx, ctx.tokens[:, s:].repeat(k, 1), kwargs)
        if self.skips(layer):
            hook = _resid_pre(layer)
            x = ctx.resid[layer][:, s:].repeat(k, 1, 1)
            direct = [e for e in edits if e.feature.hook_name == hook]
            if direct:  # the input of block `layer` is this tensor: edit it here, not by a hook
                x = _edit_hook(hook, direct, {})(x, None)
            kwargs = {"past_kv_cache": self._tiled_cache(ctx, s, k)} if s else {}
            with _editing(self.model, [e for e in edits if e.feature.hook_name != hook]):
                return self._head(self.model(x, start_at_layer=layer, stop_at_layer=self.dims.n_layers, **kwargs))
        kwargs = {("past_key_values" if self.bridge else "past_kv_cache"): self._tiled_cache(ctx, s, k)} if s else {}
        with _editing(self.model, edits):
            if self.bridge:
                return self._bridge_logits(ctx, ctx.tokens[:, s:].repeat(k, 1), kwargs)
            return self.model(ctx.tokens[:, s:].repeat(k, 1), **kwargs)[:, -1]

    def _bridge_logits(self, ctx: _Clean, tokens: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The bridge's last-position logits (all, or ``ctx.columns``) of ``model(tokens, **kwargs)``."""
        if self.on["last"]:
            kwargs = {**kwargs, "logits_to_keep": 1}
        if self.uses_columns(ctx):
            assert self.unembed is not None and ctx.columns is not None
            return self.unembed.run(lambda: self.model(tokens, **kwargs), ctx.columns)
        return self.model(tokens, **kwargs)[:, -1]


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


def _in_columns(batch: ProbeBatch, columns: Tensor) -> ProbeBatch:
    """``batch`` with answer and alternatives as indices into ``columns`` (which holds them all)."""
    lookup = torch.full((int(columns.max()) + 1,), -1, dtype=torch.long, device=columns.device)
    lookup[columns] = torch.arange(len(columns), device=columns.device)
    alts = batch.alternatives
    return replace(
        batch, answer=lookup[batch.answer], alternatives=torch.where(alts >= 0, lookup[alts.clamp(min=0)], -1)
    )


def _last_only(feature: Feature, n_layers: int) -> bool:
    """Whether only the last position of ``feature`` can move the last position's logits.

    Neurons and head outputs of the last block feed only their own position (no later
    attention reads them); value vectors and residual dimensions are read by attention.
    """
    return feature.layer == n_layers - 1 and feature.kind in ("neuron", "head")


def _plan(
    features: Sequence[Feature], per_pass: int, n_layers: int, overhead: float = 0.0
) -> list[tuple[int, list[int], bool]]:
    """Chunks of at most ``per_pass`` feature indices in layer order: ``(first layer, indices, last_only)``.

    A chunk's pass runs blocks ``first layer..`` for all its features, so a feature of a
    later block in it pays for blocks it cannot change; every pass also costs about
    ``overhead`` features' worth of work in each block it runs. The chunks minimise
    ``sum((n_layers - first layer) * (len(chunk) + overhead))``: the features of one block
    fill whole chunks of their own, and the rest (fewer than ``per_pass`` per block) are
    split where starting a new pass costs less than carrying them through earlier blocks.
    Last-block features read only at the last position (``_last_only``) get chunks of
    their own. ``overhead=0``: one block per chunk (except for the size cap); ``inf``
    (passes that run every block anyway): consecutive chunks of ``per_pass``.
    """
    key = {i: (features[i].layer, _last_only(features[i], n_layers)) for i in range(len(features))}
    order = sorted(range(len(features)), key=key.__getitem__)
    if math.isinf(overhead):
        return _chunks([order[s : s + per_pass] for s in range(0, len(order), per_pass)], features, key)
    chunks: list[list[int]] = []
    rest: list[int] = []  # what is left of each block's features after its full chunks
    for _, group_iter in groupby(order, key=key.__getitem__):
        group = list(group_iter)
        full = len(group) - len(group) % per_pass
        chunks += [group[s : s + per_pass] for s in range(0, full, per_pass)]
        rest += group[full:]
    depth = [n_layers - features[i].layer for i in rest]
    last = [key[i][1] for i in rest]  # sorted: last-only features come at the end
    best, cut = [0.0] + [math.inf] * len(rest), [0] * (len(rest) + 1)
    for i in range(1, len(rest) + 1):
        for j in range(max(0, i - per_pass), i):
            if last[j] == last[i - 1] and (cost := best[j] + depth[j] * (i - j + overhead)) < best[i]:
                best[i], cut[i] = cost, j
    i = len(rest)
    while i > 0:
        chunks.append(rest[cut[i] : i])
        i = cut[i]
    return _chunks(sorted(chunks, key=lambda c: key[c[0]]), features, key)


def _chunks(
    chunks: list[list[int]], features: Sequence[Feature], key: dict[int, tuple[int, bool]]
) -> list[tuple[int, list[int], bool]]:
    return [(features[c[0]].layer, c, all(key[i][1] for i in c)) for c in chunks]


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

    runner = _Runner(model)
    n_layers = model_dims(model).n_layers
    if runner.on["prefix"]:  # passes skip the blocks before their chunk: chunks by block
        rows = _PASS_OVERHEAD_ROWS.get(_device(model).type, _PASS_OVERHEAD_ROWS_ACCELERATOR)
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

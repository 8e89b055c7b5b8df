"""The patched-pass runner of the exact scorer: one clean pass per probe batch, then patched passes.

``_Runner`` holds the shortcuts ``icp_lens.scoring.exact`` describes (key/value cache of
the positions before the first change, blocks before the feature's skipped on the
bridge, clean attention output reused, answer columns only), checks each the first time
it is used against a full pass with no edits, and turns off the one to blame when that
check fails. ``_Clean`` is what one clean pass records for the patched passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from icp_lens.edits import Edit, _edit_hook, pack_edits
from icp_lens.hooks import capturing, hooked
from icp_lens.kv_compat import bridge_kv_cache, cache_kwargs
from icp_lens.model import HookedModel, is_bridge, model_dims
from icp_lens.scoring.prefix import BridgeBlocks, ColumnUnembed, hf_cache_prefix, tiled_hf_cache

_KV_BUDGET_BYTES = 4 * 2**30  # largest key/value cache copy one patched pass may hold (else: full passes)


def _resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _editing(model: HookedModel, edits: list[Edit]) -> Any:
    """``intervene`` without its per-edit validation (done once for all features up front).

    The interventions here never read another feature (no ``Swap``), so the edit hooks
    need no captured activations.
    """
    groups: dict[str, list[Edit]] = {}
    for edit in edits:
        groups.setdefault(edit.feature.hook_name, []).append(edit)
    return hooked(model, [(name, _edit_hook(name, group, {})) for name, group in groups.items()])


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
                    with bridge_kv_cache(self.model):  # the cache fills under transformers >= 5.24 too
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
            with bridge_kv_cache(self.model):
                return self.model(tokens, return_type="logits_and_cache")[1]
        cache = _kv_cache_class().init_cache(self.model.cfg, tokens.device, tokens.shape[0])
        self.model(tokens, past_kv_cache=cache)
        return cache

    def _tiled_cache(self, ctx: _Clean, start: int, k: int, first_layer: int = 0) -> Any:
        """The clean prefix cache of ``ctx``'s rows (the first ``ctx.tokens.shape[0]`` of the cache's), ``k`` times."""
        batch, prefix = ctx.tokens.shape[0], ctx.caches[start]
        if self.bridge:  # a fresh copy per pass: the HF forward appends to it
            return tiled_hf_cache(prefix, k, batch, first_layer, device=ctx.tokens.device)
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
            kwargs = cache_kwargs(self.model, self._tiled_cache(ctx, s, k, layer + 1 if attn else layer)) if s else {}
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
        if not s:
            kwargs = {}
        elif self.bridge:
            kwargs = cache_kwargs(self.model, self._tiled_cache(ctx, s, k))
        else:
            kwargs = {"past_kv_cache": self._tiled_cache(ctx, s, k)}
        with _editing(self.model, edits):
            if self.bridge:
                return self._bridge_logits(ctx, ctx.tokens[:, s:].repeat(k, 1), kwargs)
            return self.model(ctx.tokens[:, s:].repeat(k, 1), **kwargs)[:, -1]

    def _bridge_logits(self, ctx: _Clean, tokens: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The bridge's last-position logits (all, or ``ctx.columns``) of ``model(tokens, **kwargs)``."""
        cached = "past_key_values" in kwargs or "cache" in kwargs
        if self.on["last"]:
            kwargs = {**kwargs, "logits_to_keep": 1}
        with bridge_kv_cache(self.model) if cached else nullcontext():  # transformers >= 5.24 names it `cache`
            if self.uses_columns(ctx):
                assert self.unembed is not None and ctx.columns is not None
                return self.unembed.run(lambda: self.model(tokens, **kwargs), ctx.columns)
            return self.model(tokens, **kwargs)[:, -1]

"""One training step's forward passes: the reference stacked pass and the two fast paths.

:class:`~icp_lens.training.objectives.BatchLoss` names the row *blocks* a step needs
(``x``: the training batch; ``a``: a pair batch; ``cf``: spurious counterfactuals) and,
for the invariance term, the intervened copy ``do`` of the anchor rows (``a``, else the
first rows of ``x``) with the step's edits. This module runs them:

- :func:`stacked_forward` (:mod:`~icp_lens.training.stacked`), the reference: blocks of
  one token length are concatenated along the batch and run in one pass, the edits
  hitting the ``do`` rows only (rows never interact in a transformer, so one pass equals
  separate runs);
- :func:`branched_forward`, the fast path (:mod:`icp_lens.training.branch`): ``do`` is
  not run from the embeddings but branched off the anchor rows at the first edited
  layer, and attention the intervened copy would throw away is skipped;
- :func:`suffix_forward`, the fast path for edits that start at a later position (a
  ``resample`` from a counterfactual that shares the prompt's first ``p`` tokens): the
  clean pass keeps its key/value cache, and ``do`` runs positions ``p..`` only, reading
  the clean keys and values of positions ``< p`` (with their gradient) from that cache.
  Where every layer whose keys and values the edits could change has all its heads
  replaced (e.g. every head of a 2-layer organism flagged), ``do``'s last position, all
  the losses read, depends on no other position of its own: it runs that position alone
  (whatever ``p``, also 0);
- :class:`StepForward`, what ``BatchLoss`` calls: the cheaper fast path where one applies
  (otherwise the reference; the edits are fused and the branch planned once for both the
  cost estimate and the pass), with the first fast pass of each plan shape checked
  against the reference.

Both passes can unembed the last position only (``last_only``, a bridge's
``logits_to_keep=1``): the answer losses read nothing else, and on a real vocabulary the
unembedding of every position is a large share of a small model's forward pass.

:func:`stacked_forward` lives in :mod:`icp_lens.training.stacked`, :func:`capture_prefix`
(the values a ``resample`` patches in) and :func:`shared_prefix` (where the suffix path
can start) in :mod:`icp_lens.training.counterfactuals`; this module re-exports them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from icp_lens.edits import Edit, intervene
from icp_lens.hooks import capturing, hooked
from icp_lens.kv_compat import bridge_kv_cache, cache_kwargs
from icp_lens.interventions import Mean, Resample, Zero
from icp_lens.model import HookedModel, is_bridge, model_dims
from icp_lens.scoring.prefix import hf_cache_prefix
from icp_lens.training.branch import (
    BranchPlan,
    FusedEdit,
    branched,
    fuse_edits,
    has_active_dropout,
    plan_branch,
    suffix_start,
    tail_start,
)
from icp_lens.training.counterfactuals import capture_prefix, shared_prefix
from icp_lens.training.stacked import Outputs, _passes, _run, _split, stacked_forward

__all__ = [
    "Outputs",
    "capture_prefix",
    "shared_prefix",
    "stacked_forward",
    "branched_forward",
    "suffix_forward",
    "StepForward",
]


def _suffix_edits(edits: Sequence[Edit], start: int, seq_len: int, n: int) -> list[Edit] | None:
    """``edits`` (all at positions ``start..`` of rows ``(0, n)``) re-addressed to a pass over positions
    ``start..`` only; ``None`` if one of them cannot be (then the suffix path does not apply)."""
    suffix = tuple(range(start, seq_len))
    out = []
    for e in edits:
        if e.positions != suffix or e.rows != (0, n):
            return None
        iv = e.intervention
        if isinstance(iv, Resample) and iv.source.shape[1] == seq_len:
            iv = Resample(iv.source[:, start:], "exact")
        elif isinstance(iv, Mean) and iv.per_position:
            iv = Mean(iv.value[start:], per_position=True)
        elif not isinstance(iv, (Zero, Mean)):
            return None
        out.append(replace(e, intervention=iv, positions=None, rows=None))
    return out


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_AFTER_ATTENTION = ("hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_pre",
                    "mlp.hook_post", "hook_mlp_in", "ln2.hook_normalized")  # fmt: skip


def _representation_ok(rep_hook: str | None, first_layer: int) -> bool:
    """Whether ``rep_hook`` sees the grown batch (after the branch, outside skipped attention)."""
    if rep_hook is None:
        return True
    match = _BLOCK_HOOK.match(rep_hook)
    if match is None:  # ln_final, unembed: after every block
        return True
    layer, suffix = int(match[1]), match[2]
    return layer > first_layer and suffix == "hook_resid_pre" or layer >= first_layer and suffix in _AFTER_ATTENTION


def branched_forward(
    model: HookedModel,
    blocks: list[tuple[str, Tensor]],
    edits: Sequence[Edit],
    source: str,
    n: int,
    rep_hook: str | None = None,
    *,
    last_only: bool = False,
    dropout: bool | None = None,
) -> Outputs | None:
    """The blocks plus ``"do"`` (the first ``n`` rows of block ``source`` under ``edits``),
    with ``do`` branched off ``source`` at the first edited layer; ``None`` when the fast
    path cannot express this step exactly (then use :func:`stacked_forward`).

    ``dropout``: whether a dropout module is active (``None``: look; it walks the model).
    """
    result = _branched_forward(model, blocks, edits, source, n, rep_hook, last_only=last_only, dropout=dropout)
    return None if result is None else result[0]


def _branch_plan(model: HookedModel, edits: Sequence[Edit], n: int, seq_len: int) -> BranchPlan | None:
    """The branch plan of ``edits`` on ``n`` anchor rows of ``seq_len`` tokens, or ``None`` if they cannot be fused."""
    fused = fuse_edits(model, edits, n, seq_len)
    return None if fused is None else plan_branch(fused, model_dims(model).n_layers)


def _branched_forward(
    model: HookedModel,
    blocks: list[tuple[str, Tensor]],
    edits: Sequence[Edit],
    source: str,
    n: int,
    rep_hook: str | None,
    *,
    last_only: bool,
    dropout: bool | None,
    plan: BranchPlan | None = None,
) -> tuple[Outputs, tuple] | None:
    """:func:`branched_forward`, plus the branch plan's shape (which hooks ran where).

    ``plan``: the plan of ``edits`` for the source block's token length, when the caller
    has made it already (``StepForward`` does, to compare the paths' costs).
    """
    if dropout is None:
        dropout = has_active_dropout(model)
    if not edits or not is_bridge(model) or not hasattr(model, "blocks") or dropout:
        return None  # dropout: the branch would share the clean rows' dropout masks in the shared prefix
    out: Outputs = {}
    shape: tuple = ()
    for tokens, spans in _passes(blocks):
        if source not in spans:
            with capturing(model, [rep_hook] if rep_hook else [], detach=False) as store:
                logits = _run(model, tokens, last_only)
            _split(logits, store.get(rep_hook) if rep_hook else None, spans, out)
            continue
        n_base, seq_len = tokens.shape
        if plan is None:
            plan = _branch_plan(model, edits, n, seq_len)
        if n_base < 2 or plan is None:
            return None
        if not _representation_ok(rep_hook, plan.first_layer):
            return None
        lo = spans[source][0]
        kinds = tuple(sorted((e.kind, e.layer, e.covers_all, e.start > 0) for e in plan.edits.values()))
        shape = (plan.first_layer, tuple(sorted(plan.shrunk)), kinds, tuple(spans), rep_hook)
        with ExitStack() as stack:
            stack.enter_context(branched(model, plan, n_base, (lo, lo + n)))
            store = stack.enter_context(capturing(model, [rep_hook] if rep_hook else [], detach=False))
            logits = _run(model, tokens, last_only)
            captured = store.get(rep_hook) if rep_hook else None
        grown = n_base + n
        if logits.shape[0] != grown or (captured is not None and captured.shape[0] != grown):
            raise RuntimeError(f"The branched pass returned {logits.shape[0]} rows, expected {grown}")
        _split(logits, captured, {**spans, "do": (n_base, grown)}, out)
    return out, shape


def suffix_forward(
    model: HookedModel,
    blocks: list[tuple[str, Tensor]],
    edits: Sequence[Edit],
    source: str,
    n: int,
    rep_hook: str | None = None,
    *,
    last_only: bool = False,
    first: int | None = None,
) -> Outputs | None:
    """The blocks plus ``"do"``, where ``do`` runs positions ``first..`` only, on the clean pass's
    keys and values of positions ``< first``.

    Up to where the edits start (``p``), the intervened copy computes exactly what the
    clean rows compute, so its keys and values there *are* the clean ones: the copy
    attends to them through the clean pass's cache (the gradient of the invariance term
    reaches the clean prefix through them, as in the stacked pass, where it reaches the
    copy's identical prefix). On an organism whose planted token is the last word this
    runs 2 of 12 positions. Where every layer whose keys and values the edits could
    change has all its heads replaced (:func:`~icp_lens.training.branch.tail_start`: the
    copy's attention output there is the replacement, whatever it attends to), the copy's
    last position reads nothing else of its own, and only that position runs
    (``first = seq_len - 1``; then ``p`` may also be 0).

    ``first``: the first position to run (``None``: as far as the edits allow). The
    returned ``do`` logits (and representation) cover positions ``first..`` only; the
    losses read the last one. The edits are applied fused (one write per hook point,
    :class:`~icp_lens.training.branch.FusedEdit`) where :func:`fuse_edits` can express them,
    else through :func:`~icp_lens.edits.intervene` (then ``first`` must be ``p``). ``None``
    when the pass does not apply (then use another path): not a ``TransformerBridge``, no
    position to skip, an intervention it cannot re-address, or a model whose forward
    returns no full key/value cache.
    """
    if not edits or not is_bridge(model):
        return None
    seq_len = dict(blocks)[source].shape[1]
    fused = fuse_edits(model, edits, n, seq_len)
    return _suffix_forward(model, blocks, edits, source, n, rep_hook, last_only=last_only, first=first, fused=fused)


def _suffix_forward(
    model: HookedModel,
    blocks: list[tuple[str, Tensor]],
    edits: Sequence[Edit],
    source: str,
    n: int,
    rep_hook: str | None,
    *,
    last_only: bool,
    first: int | None,
    fused: dict[str, FusedEdit] | None,
) -> Outputs | None:
    """:func:`suffix_forward` with the edits already fused (``fused``: ``fuse_edits``'s result, ``None``
    where they cannot be fused)."""
    tokens_do = dict(blocks)[source][:n]
    seq_len = tokens_do.shape[1]
    allowed = _suffix_first(model, edits, fused, seq_len)
    if first is None:
        first = allowed
    elif allowed is None or first > allowed:
        raise ValueError(f"A suffix pass from position {first} would read clean keys and values where the "
                         f"intervened copy's differ (at most {allowed})")  # fmt: skip
    if not first or first >= seq_len:
        return None
    if fused is not None:  # one write per hook point
        apply_edits = partial(hooked, model, [(name, e.window(first).hook()) for name, e in fused.items()])
    else:
        moved = _suffix_edits(edits, first, seq_len, n)
        if moved is None:
            return None
        apply_edits = partial(intervene, model, moved)
    out: Outputs = {}
    cache = None
    for tokens, spans in _passes(blocks):
        with capturing(model, [rep_hook] if rep_hook else [], detach=False) as store:
            if source in spans:
                kwargs = {"logits_to_keep": 1} if last_only else {}
                with bridge_kv_cache(model):  # the cache fills under transformers >= 5.24 too
                    logits, cache = model(tokens, return_type="logits_and_cache", **kwargs)
                lo = spans[source][0]
            else:
                logits = _run(model, tokens, last_only)
        _split(logits, store.get(rep_hook) if rep_hook else None, spans, out)
    prefix = None if cache is None else hf_cache_prefix(cache, first, seq_len)
    if prefix is None:
        return None
    for layer in prefix.layers:  # this copy's rows: the intervened copy of source's first n rows
        layer.keys, layer.values = layer.keys[lo : lo + n], layer.values[lo : lo + n]
    with ExitStack() as stack:
        stack.enter_context(apply_edits())
        stack.enter_context(bridge_kv_cache(model))  # transformers >= 5.24 names the cache `cache`
        store = stack.enter_context(capturing(model, [rep_hook] if rep_hook else [], detach=False))
        kwargs = {**cache_kwargs(model, prefix), **({"logits_to_keep": 1} if last_only else {})}
        logits = model(tokens_do[:, first:], **kwargs)
        captured = store.get(rep_hook) if rep_hook else None
    out["do"] = (logits, logits[:, -1], captured)
    return out


def _suffix_first(
    model: HookedModel, edits: Sequence[Edit], fused: dict[str, FusedEdit] | None, seq_len: int
) -> int | None:
    """The first position the suffix pass runs for ``edits``: the last one where
    :func:`~icp_lens.training.branch.tail_start` allows, else where the edits start."""
    if fused is not None:
        return tail_start(fused, model_dims(model).n_layers, seq_len)
    return suffix_start(edits, seq_len)


class StepForward:
    """The forward pass(es) of ``BatchLoss``: the cheaper fast path that applies, else the reference.

    ``branch=False`` always runs the reference (:func:`stacked_forward`). The first fast
    pass of every plan shape (suffix or branched, the hook points edited, which layers skip
    attention, whether the suffix pass skips edited positions) is checked against the
    reference on the same inputs (no gradient); a disagreement beyond ``tolerance`` or an
    error in the fast path switches it off for good, with a warning. ``last_only`` (for
    losses that read the last position only) unembeds only the last position, on a
    ``TransformerBridge``. ``paths`` names the fast paths it may take (both by default).
    """

    def __init__(
        self, model: HookedModel, *, branch: bool = True, last_only: bool = False, tolerance: float = 1e-4
    ) -> None:
        self.model = model
        self.branch = branch
        self.last_only = last_only and is_bridge(model)
        self._dropout: dict[bool, bool] = {}  # model.training -> any dropout active (looked up once per mode)
        self.tolerance = tolerance
        self.checked: set[tuple] = set()  # the plan shapes checked against the reference
        self.paths: tuple[str, ...] = ("suffix", "branched")  # the fast paths it may take (tests pin one)
        self.last_path: str | None = None  # "suffix", "branched" or "stacked": what the last call ran

    def __call__(
        self,
        blocks: list[tuple[str, Tensor]],
        edits: Sequence[Edit],
        do: tuple[str, int, Tensor] | None,
        rep_hook: str | None = None,
    ) -> Outputs:
        """``do = (source block, rows, tokens)``: the intervened copy of ``source``'s first rows."""
        if do is not None and edits and self.branch:
            out = self._fast_paths(blocks, edits, do, rep_hook)
            if out is not None:
                return out
        self.last_path = "stacked"
        full = blocks + [("do", do[2])] if do is not None else blocks
        return stacked_forward(self.model, full, edits if do is not None else [], rep_hook, last_only=self.last_only)

    def _fast_paths(self, blocks: list[tuple[str, Tensor]], edits: Sequence[Edit], do: tuple[str, int, Tensor],
                    rep_hook: str | None) -> Outputs | None:  # fmt: skip
        """The cheaper of the suffix and the branched pass that applies (then the other), or ``None``.

        The edits are fused and the branch planned once, for both the cost estimate and the
        pass. Costs, as a fraction of a full pass over the copy (forward and backward): the
        suffix pass runs every layer at positions ``first..``: ``(T - first) / T``. The
        branched pass runs all positions from the first edited layer, each layer's attention
        counting half a layer unless the plan skips it for the copy. An organism whose
        planted token is the last word takes the suffix pass (2 of 12 positions); so does one
        whose flagged heads cover every layer from the first edited one (1 position); one
        whose planted name is the first word and whose flagged heads cover some layers only
        takes the branched pass.
        """
        if self._dropout_on() or not is_bridge(self.model):
            return None  # dropout: the copy would share the clean rows' dropout masks where it is not run
        source, n, tokens = do
        seq_len = tokens.shape[1]
        fused = fuse_edits(self.model, edits, n, seq_len)
        n_layers = model_dims(self.model).n_layers
        plan = None if fused is None else plan_branch(fused, n_layers)
        first = _suffix_first(self.model, edits, fused, seq_len)
        last_only = self.last_only
        candidates: list[tuple[float, str, Callable[[], tuple[Outputs, tuple] | None]]] = []
        if first and first < seq_len:
            hooks = tuple(sorted({e.feature.hook_name for e in edits}))
            tail = fused is not None and first > next(iter(fused.values())).start  # skips edited positions
            shape = ("suffix", hooks, fused is not None, tail, tuple(name for name, _ in blocks), rep_hook)

            def suffix() -> tuple[Outputs, tuple] | None:
                out = _suffix_forward(self.model, blocks, edits, source, n, rep_hook, last_only=last_only,
                                      first=first, fused=fused)  # fmt: skip
                return None if out is None else (out, shape)

            candidates.append(((seq_len - first) / seq_len, "suffix", suffix))
        if plan is not None:
            cost = sum(1.0 if layer not in plan.shrunk else 0.5 for layer in range(plan.first_layer, n_layers))
            candidates.append((cost / n_layers, "branched", lambda: _branched_forward(
                self.model, blocks, edits, source, n, rep_hook, last_only=last_only, dropout=False, plan=plan
            )))  # fmt: skip
        for _, path, run in sorted(candidates, key=lambda c: c[0]):
            if path not in self.paths:
                continue
            out = self._fast(path, run, blocks, edits, do, rep_hook)
            if out is not None or not self.branch:
                return out
        return None

    def _fast(self, path: str, run: Callable[[], tuple[Outputs, tuple] | None], blocks: list[tuple[str, Tensor]],
              edits: Sequence[Edit], do: tuple[str, int, Tensor], rep_hook: str | None) -> Outputs | None:  # fmt: skip
        """``run()`` (a fast path: ``(outputs, plan shape)`` or ``None``), checked against the reference
        the first time each plan shape is seen; ``None`` when it does not apply or was switched off."""
        try:
            result = run()
        except Exception as exc:  # an architecture the fast path does not fit: use the reference from now on
            self._disable(f"it failed ({type(exc).__name__}: {exc})")
            return None
        if result is None:
            return None
        out, shape = result
        if shape not in self.checked:
            self._check(out, blocks, edits, do, rep_hook)
            self.checked.add(shape)
        if not self.branch:
            return None
        self.last_path = path
        return out

    def _dropout_on(self) -> bool:
        """Whether a dropout module is active (looked up once per train/eval mode)."""
        training = bool(self.model.training)
        if training not in self._dropout:
            self._dropout[training] = has_active_dropout(self.model)
        return self._dropout[training]

    def _check(self, out: Outputs, blocks: list[tuple[str, Tensor]], edits: Sequence[Edit],
               do: tuple[str, int, Tensor], rep_hook: str | None) -> None:  # fmt: skip
        with torch.no_grad():
            reference = stacked_forward(self.model, blocks + [("do", do[2])], edits, rep_hook, last_only=self.last_only)
        worst = 0.0
        for name, (full, last, _) in reference.items():
            # the suffix pass's ``do`` logits cover its own positions only: compare the last one
            logits, got = (last, out[name][1].detach()) if name == "do" else (full, out[name][0].detach())
            worst = max(worst, float((got - logits).abs().max() / (1.0 + logits.abs().max())))
        if worst > self.tolerance:
            self._disable(f"its logits differ from the reference pass by {worst:.2e} (relative)")

    def _disable(self, why: str) -> None:
        warnings.warn(
            f"icp_lens: the branched invariance pass is off for this run because {why}; "
            "training continues with the (slower) stacked reference pass.",
            RuntimeWarning,
            stacklevel=3,
        )
        self.branch = False

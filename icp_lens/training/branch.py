"""The invariance step's fast path: run the clean rows once, branch off the intervened copy.

The invariance term compares the model on ``x`` with the model on ``x`` under
``do(f = I(f))``. The reference pass (:meth:`BatchLoss._forward_stacked
<icp_lens.training.objectives.BatchLoss>`) stacks the clean rows and a copy of them along
the batch and edits the copy: rows never interact in a transformer, so this equals two
separate runs. It wastes work twice over:

- up to the first edited hook point the copy computes exactly what the clean rows compute
  (a *shared prefix*), forward and backward;
- where an edit overwrites a hook point completely (every head of a layer resampled, as
  the scorer's top features often are), everything the copy computed to feed that hook
  point is thrown away (a *dead branch*), forward and backward.

The branched pass removes both with hooks on the same model, no other forward code:

1. The model runs on the clean rows alone. At ``blocks.L0.hook_resid_pre`` of the first
   edited layer ``L0`` the hook appends a copy of the anchor rows (the *branch*); from
   here on the batch holds ``[clean rows; intervened rows]``.
2. In every layer where the intervened rows' attention output does not depend on their
   own attention input, attention runs on the clean rows only: ``attn.hook_in`` drops
   the branch and ``attn.hook_z`` appends it again. That is layer ``L0`` when no residual
   or value edit comes first (the branch's input equals the clean input: copy the clean
   heads, then edit), and any layer whose every head is edited (the branch's heads are
   the replacement values, whatever its input).
3. All of a step's edits at one hook point are one ``index_copy`` on the branch's rows
   (the reference writes each feature into a clone separately, and its backward clones
   the gradient once per feature).
4. Attention layers that run on the grown batch get their ``attention_mask`` rows
   re-indexed to the grown batch (a module pre-hook); icp_lens never pads, so every row's
   mask is the causal mask, but the rows are mapped exactly anyway.

Exactness: every value the loss reads is computed by the same operations on the same
inputs as in the reference pass; the gradients differ only in summation order (a
shared prefix receives the sum of both branches' gradients at once), ~1e-7 relative.
:meth:`BatchLoss <icp_lens.training.objectives.BatchLoss>` checks the first branched pass
against the reference pass and falls back to the reference for good (with a warning) if
they ever disagree, so an architecture whose attention does not fire these hooks cannot
silently train on wrong values. Dropout (a different random mask per row) and batches of
one row (where a wrong batch size would broadcast instead of failing) always take the
reference path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from icp_lens.devices import input_device
from icp_lens.edits import Edit
from icp_lens.features import feature_count
from icp_lens.hooks import HookFn, hooked, module_hooks
from icp_lens.interventions import Mean, Resample, Zero
from icp_lens.model import HookedModel

__all__ = [
    "FusedEdit",
    "BranchPlan",
    "fuse_edits",
    "suffix_start",
    "tail_start",
    "plan_branch",
    "branched",
    "has_active_dropout",
]

FillMode = Literal["zero", "value", "source"]


@dataclass(frozen=True, eq=False)
class FusedEdit:
    """One step's edits at one hook point: the unit indices (dimension 2) and their new values.

    ``mode`` says where the values come from: ``"zero"``; ``"value"`` (fitted means,
    ``values`` ``[k, *unit]`` or ``[pos, k, *unit]`` when ``per_position``); ``"source"``
    (resampled activations, ``values`` ``[rows, pos_source, k, *unit]``, right-aligned
    when the source is longer). ``n_units`` is the hook point's unit count, so
    ``covers_all`` says whether the edit overwrites the whole activation. ``start``: the first
    edited position (a ``resample`` from a counterfactual that shares the prompt's first
    tokens); before it the branch keeps its own values, which equal the clean rows'.
    """

    hook_name: str
    kind: str
    layer: int
    index: Tensor
    mode: FillMode
    values: Tensor | None
    per_position: bool
    n_units: int
    start: int = 0

    @property
    def covers_all(self) -> bool:
        return self.index.numel() == self.n_units

    def replacement(self, n: int, seq_len: int, like: Tensor) -> Tensor:
        """The new values of the edited units at positions ``start..``, ``[n, seq_len - start, k, *unit]``
        (dtype/device of ``like``)."""
        unit = tuple(like.shape[3:])
        k, width = self.index.numel(), seq_len - self.start
        if self.mode == "zero":
            return like.new_zeros((n, width, k, *unit))
        assert self.values is not None
        values = self.values.to(like.device, like.dtype)
        if self.mode == "value":
            values = values[None, self.start :] if self.per_position else values[None, None]
            return values.expand(n, width, k, *unit)
        return values[:, values.shape[1] - width :]

    def apply(self, rows: Tensor) -> Tensor:
        """``rows`` (the branch's activation, ``[n, pos, units, *unit]``) with the edited units replaced."""
        index = self.index.to(rows.device)
        if self.start == 0:
            return rows.index_copy(2, index, self.replacement(rows.shape[0], rows.shape[1], rows))
        tail = rows[:, self.start :].index_copy(2, index, self.replacement(rows.shape[0], rows.shape[1], rows))
        return torch.cat([rows[:, : self.start], tail], dim=1)

    def full(self, n: int, like: Tensor) -> Tensor:
        """The whole activation of ``n`` branch rows when the edit ``covers_all`` and ``start == 0``
        (shape of ``like``'s rows)."""
        assert self.covers_all and self.start == 0
        return self.replacement(n, like.shape[1], like)  # the index is sorted and complete: arange(n_units)

    def window(self, first: int) -> FusedEdit:
        """This edit re-addressed to a pass over positions ``first..`` only (``first >= start``).

        In that pass every position is edited (``start`` 0): per-position means drop their
        first ``first`` rows, resampled values are right-aligned (their last positions
        are read), so they need no change.
        """
        if not self.start <= first:
            raise ValueError(f"A pass from position {first} would skip edited positions {self.start}..")
        values = self.values
        if self.mode == "value" and self.per_position:
            assert values is not None
            values = values[first:]
        return replace(self, values=values, start=0)

    def hook(self) -> HookFn:
        """A hook that applies this edit to every row of a pass (the copy alone: the suffix pass)."""
        if self.covers_all and self.start == 0:  # nothing of the activation survives: no gradient to it
            return lambda act, hook: self.full(act.shape[0], act).contiguous()  # the model may ``view`` it
        return lambda act, hook: self.apply(act)


def fuse_edits(model: HookedModel, edits: Sequence[Edit], rows: int, seq_len: int) -> dict[str, FusedEdit] | None:
    """The edits grouped by hook point and fused, or ``None`` if the fast path cannot express them exactly.

    The step's edits (from ``BatchLoss._choose_edits``) touch the anchor rows ``(0, rows)``
    at all positions, or all of them at positions ``start..`` (a suffix); each hook point
    must carry one kind of intervention (``Zero``, ``Mean`` or ``Resample``). Anything else
    (and any case where the reference would raise, e.g. a counterfactual shorter than the
    prompt) goes to the reference path.
    """
    start = suffix_start(edits, seq_len)
    if start is None:
        return None
    groups: dict[str, list[Edit]] = {}
    for edit in edits:
        if edit.rows != (0, rows):
            return None
        groups.setdefault(edit.feature.hook_name, []).append(edit)
    fused: dict[str, FusedEdit] = {}
    for hook_name, group in groups.items():
        by_index = {e.feature.index: e for e in group}  # a repeated feature gets the same value twice
        order = sorted(by_index)
        kinds = {type(by_index[i].intervention) for i in order}
        if len(kinds) != 1:
            return None
        kind = kinds.pop()
        interventions = [by_index[i].intervention for i in order]
        feature = group[0].feature
        values: Tensor | None = None
        per_position = False
        if kind is Zero:
            mode: FillMode = "zero"
        elif kind is Mean:
            mode = "value"
            flags = {m.per_position for m in interventions}  # type: ignore[union-attr]
            if len(flags) != 1:
                return None
            per_position = flags.pop()
            values = torch.stack([m.value for m in interventions], dim=1 if per_position else 0)  # type: ignore[union-attr]
            if per_position and values.shape[0] != seq_len:
                return None
        elif kind is Resample:
            mode = "source"
            sources = [r.source for r in interventions]  # type: ignore[union-attr]
            if any(s.shape[0] != rows for s in sources):
                return None
            src_len = sources[0].shape[1]
            if src_len != seq_len and (src_len < seq_len or any(r.align != "right" for r in interventions)):  # type: ignore[union-attr]
                return None
            values = torch.stack(sources, dim=2)
        else:
            return None
        fused[hook_name] = FusedEdit(
            hook_name=hook_name, kind=feature.kind, layer=feature.layer,
            index=torch.tensor(order, dtype=torch.long, device=input_device(model)), mode=mode, values=values,
            per_position=per_position,
            n_units=feature_count(model, feature.kind), start=start,
        )  # fmt: skip
    return fused


def suffix_start(edits: Sequence[Edit], seq_len: int) -> int | None:
    """The first edited position when every edit covers all positions (0) or the same suffix
    ``start..seq_len - 1``; ``None`` for any other position pattern."""
    starts = set()
    for edit in edits:
        positions = edit.positions
        if positions is None:
            starts.add(0)
        elif positions and positions == tuple(range(positions[0], seq_len)) and positions[0] >= 0:
            starts.add(positions[0])
        else:
            return None
    return starts.pop() if len(starts) == 1 else None


#: per feature kind, how many layers after its own an edit first changes the keys and values that
#: later positions of the intervened copy read (a head's output enters the residual stream after its layer)
_KV_LAG = {"resid": 0, "value": 0, "key": 0, "query": 1, "head": 1, "neuron": 1}


def tail_start(edits: dict[str, FusedEdit], n_layers: int, seq_len: int) -> int:
    """The first position the intervened copy has to compute itself when its last position is all
    the loss reads; before it, it can read the clean rows' keys and values.

    Before the edits' ``start`` the copy equals the clean rows. From the first layer ``E``
    whose keys or values an edit can change (a residual, value or key edit: its own
    layer; a head, query or neuron edit: the next one), they differ, unless every layer
    from ``E`` on has *all* its heads replaced: then the copy's attention output in those
    layers is the replacement, whatever its keys and values, and below ``E`` they equal the
    clean ones. In that case the copy's last position depends on no other position of its
    own, and ``seq_len - 1`` is returned; otherwise ``start``.
    """
    start = next(iter(edits.values())).start
    if any(e.kind not in _KV_LAG for e in edits.values()):
        return start
    first = min(e.layer + _KV_LAG[e.kind] for e in edits.values())
    dead = {e.layer for e in edits.values() if e.kind == "head" and e.covers_all}
    return seq_len - 1 if all(layer in dead for layer in range(first, n_layers)) else start


@dataclass(frozen=True)
class BranchPlan:
    """Where the branch starts and which layers run attention on the clean rows only."""

    first_layer: int
    n_layers: int
    edits: dict[str, FusedEdit]
    shrunk: frozenset[int]

    def edit(self, kind: str, layer: int) -> FusedEdit | None:
        for e in self.edits.values():
            if e.kind == kind and e.layer == layer:
                return e
        return None


def plan_branch(edits: dict[str, FusedEdit], n_layers: int) -> BranchPlan:
    """Decide the branch point and, per layer, whether attention can skip the branch rows."""
    first = min(e.layer for e in edits.values())
    shrunk = set()
    for layer in range(first, n_layers):
        kinds = {e.kind for e in edits.values() if e.layer == layer}
        head = next((e for e in edits.values() if e.kind == "head" and e.layer == layer), None)
        if "value" in kinds:
            continue
        shared = layer == first and "resid" not in kinds  # the branch's attention input is a copy
        dead = head is not None and head.covers_all  # the branch's attention output is all replacement
        if shared or dead:
            shrunk.add(layer)
    return BranchPlan(first_layer=first, n_layers=n_layers, edits=edits, shrunk=frozenset(shrunk))


def has_active_dropout(model: nn.Module) -> bool:
    """Whether any dropout module would draw a random mask in the current mode."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in model.modules())


@contextmanager
def branched(model: HookedModel, plan: BranchPlan, n_base: int, source: tuple[int, int]) -> Iterator[None]:
    """Hooks that grow a forward pass on ``n_base`` rows into ``n_base + n`` rows.

    The last ``n = source[1] - source[0]`` rows are the branch: a copy of rows
    ``source`` taken at the first edited layer, with ``plan``'s edits applied. Use as
    ``with branched(...): logits = model(tokens)``; the logits then hold the clean rows
    followed by the branch rows.
    """
    lo, hi = source
    n = hi - lo
    first = plan.first_layer

    def branch_rows(act: Tensor) -> Tensor:
        return act[n_base:]

    def with_branch(act: Tensor, branch: Tensor) -> Tensor:
        return torch.cat([act[:n_base], branch])

    def start(act: Tensor, hook: Any) -> Tensor:  # blocks.L0.hook_resid_pre
        copy = act[lo:hi]
        edit = plan.edit("resid", first)
        return torch.cat([act, edit.apply(copy) if edit is not None else copy])

    def edit_branch(edit: FusedEdit) -> HookFn:
        def hook_fn(act: Tensor, hook: Any) -> Tensor:
            return with_branch(act, edit.apply(branch_rows(act)))

        return hook_fn

    def drop_branch(act: Tensor, hook: Any) -> Tensor:  # attn.hook_in of a shrunk layer
        return act[:n_base]

    def rejoin(layer: int) -> HookFn:  # attn.hook_z of a shrunk layer: append the branch's heads
        edit = plan.edit("head", layer)

        def hook_fn(z: Tensor, hook: Any) -> Tensor:
            if edit is not None and edit.covers_all and edit.start == 0:
                return torch.cat([z, edit.full(n, z)])
            # shared prefix (or positions before the edits start): the branch's heads equal the anchor rows'
            copy = z[lo:hi]
            return torch.cat([z, edit.apply(copy) if edit is not None else copy])

        return hook_fn

    hooks: list[tuple[str, HookFn]] = [(f"blocks.{first}.hook_resid_pre", start)]
    grown: list[int] = []  # layers whose attention runs on the grown batch
    for layer in range(first, plan.n_layers):
        resid = plan.edit("resid", layer)
        if resid is not None and layer != first:
            hooks.append((resid.hook_name, edit_branch(resid)))
        if layer in plan.shrunk:
            hooks.append((f"blocks.{layer}.attn.hook_in", drop_branch))
            hooks.append((f"blocks.{layer}.attn.hook_z", rejoin(layer)))
        else:
            grown.append(layer)
            for kind in ("value", "head"):
                edit = plan.edit(kind, layer)
                if edit is not None:
                    hooks.append((edit.hook_name, edit_branch(edit)))
        neuron = plan.edit("neuron", layer)
        if neuron is not None:
            hooks.append((neuron.hook_name, edit_branch(neuron)))

    where = input_device(model)
    row_map = torch.cat([torch.arange(n_base, device=where), torch.arange(lo, hi, device=where)])

    def grow_mask(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
        mask = kwargs.get("attention_mask")
        if hidden is None or not isinstance(mask, Tensor) or mask.dim() < 2 or mask.shape[0] in (1, hidden.shape[0]):
            return args, kwargs  # no mask, or one that broadcasts / already fits
        if mask.shape[0] != n_base:
            raise RuntimeError(f"attention_mask has {mask.shape[0]} rows, the pass {n_base} (+{n} branch rows)")
        return args, {**kwargs, "attention_mask": mask.index_select(0, row_map.to(mask.device))}

    pre = [(model.blocks[layer].attn, grow_mask) for layer in grown]
    with ExitStack() as stack:
        stack.enter_context(module_hooks(pre_kwargs=pre))
        stack.enter_context(hooked(model, hooks))
        yield

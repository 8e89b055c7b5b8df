"""AtP and the two AtP* fixes (Kramár et al. 2024): one probe batch of attribution patching.

``icp_lens.scoring.attribution`` explains AtP and holds the entry point; this module runs
one batch of it, with or without the fixes of AtP*:

**QK fix** (``qk_fix=True``). A query or key feature moves the output only through its
head's attention pattern ``A = softmax(scores)``, and the softmax is where plain AtP's
linearisation fails (a saturated head has a near-zero gradient however far the patch
moves its pattern). So for query and key features the softmax is not linearised: the
patched pattern ``A'`` is recomputed exactly and only the rest of the model is:

    dP  ~=  sum over the head's pattern entries (query pos i, key pos j) of  dP/dA[i, j] * (A'[i, j] - A[i, j]).

``A'`` comes from one extra (gradient-free, stopped after the last layer needed) forward
pass per kind: in every layer that has query features, ``hook_q`` is set to its clean
value plus the intervention's change (all scored heads at once) and ``hook_k`` to its
clean value; the pass records ``hook_attn_scores`` and ``A' = softmax`` of them under the
causal mask. A head's scores depend on its own query and its key/value head's key only,
so one pass gives every head's ``A'`` with only its own feature patched (a key feature of
a grouped-query model changes all query heads of its group, and their patterns all
count). A key at position ``j`` changes column ``j`` of every query row that sees it; a
query at ``i`` changes row ``i``. The model computes the scores itself, so its own scale,
rotary embedding (``hook_q``/``hook_k`` sit before it on both ``TransformerBridge`` and
``HookedTransformer``), ALiBi or soft cap are applied as in the forward pass. The first
batch checks that the recorded pattern is ``softmax(hook_attn_scores)`` and refuses the
model otherwise. Cost: one forward + one backward, plus up to two partial forward passes.

**GradDrop** (``grad_drop=True``). A feature can reach the metric along several paths
whose gradients cancel (a direct effect and an opposite indirect one through a later
block), so AtP scores it near zero although patching it moves the metric. GradDrop
recomputes the AtP estimate ``L`` times (``L`` blocks), the ``l``-th time with the
gradient through block ``l``'s contribution to the residual stream (its attention and MLP
outputs, ``hook_attn_out`` and ``hook_mlp_out``) set to zero -- the forward pass is
unchanged -- and averages the magnitudes as in the paper (its Eq. 11):

    GradDrop(x, f)  =  1 / (L - 1)  *  sum over l = 0 .. L-1 of  |AtP_{-l}(x, f)|.

For a block's own neurons and heads the ``l = layer`` term is zero (every path goes
through that block's output), hence ``L - 1``. The score is a non-negative *ranking
score* that guards against false negatives from cancellation, not an estimate of the
signed effect: ``Effects.estimator`` then says ``"graddrop"`` (``"atp*"`` with the QK
fix) and signed uses of the values (the ``"flips"`` weight) are refused. Cost: one
forward and ``L`` backward passes per batch (the graph is kept between them). In a
shallow model it is a coarse tool: with ``L = 2`` a block-0 feature keeps only its path
that skips block 1, so whatever it does through block 1 is lost.

Measured on the 2-block organisms (``benchmarks/bench_attribution.py --qk-fix
--grad-drop``, resample from the spurious counterfactual, 2000 examples): the QK fix
brings the summed query/key scores per (kind, layer) to 0.75-1.01 of exact patching's
(plain AtP: 0.28-0.74, and 2.1 for one group) and raises the top-200 Spearman with
exact patching from 0.989 / 0.969 (lexical / tag) to 0.996 / 1.000; GradDrop lowers it
(0.983 / 0.955). Neither changes what AtP misses most there, the block-0 heads (0.40-0.76
of exact): that is the head output's own nonlinearity downstream, not a query/key softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from icp_lens.features import Feature, hook_name_for
from icp_lens.hooks import hooked
from icp_lens.model import HookedModel
from icp_lens.probeset import ProbeBatch

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.scoring.attribution import _Plan

__all__ = ["QK_KINDS", "QKFix", "GradDrop", "atp_batch"]

QK_KINDS: tuple[str, ...] = ("query", "key")
_PATTERN_TOLERANCE = 1e-4  # max |softmax(hook_attn_scores) - hook_pattern| the QK fix accepts


def _attn(layer: int, name: str) -> str:
    return f"blocks.{layer}.attn.{name}"


class _Stop(Exception):  # noqa: N818 - control flow, never seen by a user
    """Ends a recomputation pass once the last needed layer's scores are recorded."""


def _causal_softmax(scores: Float[Tensor, "batch head q k"]) -> Float[Tensor, "batch head q k"]:
    q, k = scores.shape[-2:]
    mask = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
    return scores.float().masked_fill(~mask, float("-inf")).softmax(-1)


class QKFix:
    """Exact attention patterns for the interventions on query and key features."""

    def __init__(self, features: Sequence[Feature]) -> None:
        self.layers = {kind: sorted({f.layer for f in features if f.kind == kind}) for kind in QK_KINDS}
        self.all_layers = sorted({layer for layers in self.layers.values() for layer in layers})
        self.checked = False

    def capture_names(self) -> list[str]:
        """The clean activations a recomputation needs (queries, keys and scores of the layers)."""
        return [_attn(layer, n) for layer in self.all_layers for n in ("hook_q", "hook_k", "hook_attn_scores")]

    def pattern_names(self) -> list[str]:
        """The attention patterns whose gradient the estimate reads."""
        return [_attn(layer, "hook_pattern") for layer in self.all_layers]

    def check(self, clean: dict[str, Tensor]) -> None:
        """Refuse a model whose attention pattern is not the causal softmax of its ``hook_attn_scores``."""
        if self.checked:
            return
        for layer in self.all_layers:
            missing = [n for n in (_attn(layer, "hook_pattern"), _attn(layer, "hook_attn_scores")) if n not in clean]
            if missing:
                raise RuntimeError(
                    f"qk_fix needs {missing} to fire in the forward pass, and this model does not run them; "
                    "use qk_fix=False (plain AtP), method='ig' or exact patching for its query and key features"
                )
            want = clean[_attn(layer, "hook_pattern")].float()
            got = _causal_softmax(clean[_attn(layer, "hook_attn_scores")])
            err = (got - want).abs().max().item()
            if not err <= _PATTERN_TOLERANCE:
                raise RuntimeError(
                    f"qk_fix recomputes blocks.{layer}.attn.hook_pattern as the causal softmax of hook_attn_scores, "
                    f"which this model does not satisfy (max difference {err:.2g}); use qk_fix=False (plain AtP), "
                    "method='ig' or exact patching for its query and key features"
                )
        self.checked = True

    def pattern_changes(
        self, model: HookedModel, tokens: Tensor, clean: dict[str, Tensor], deltas: dict[str, Tensor]
    ) -> dict[str, Float[Tensor, "batch head q k"]]:
        """``A' - A`` per query/key hook: ``A'`` with that hook's scored units patched, every head at once."""
        out: dict[str, Tensor] = {}
        for kind in QK_KINDS:
            layers = self.layers[kind]
            if not layers:
                continue
            scores: dict[int, Tensor] = {}

            def fixed(value: Tensor) -> Callable[[Tensor, Any], Tensor]:
                return lambda act, hook: value.to(act.dtype)

            def record(layer: int, scores: dict[int, Tensor] = scores, last: int = layers[-1]) -> Callable[..., None]:
                def hook(act: Tensor, hook: Any) -> None:
                    scores[layer] = act.detach()
                    if layer == last:
                        raise _Stop

                return hook

            hooks = []
            for layer in layers:
                q, k = _attn(layer, "hook_q"), _attn(layer, "hook_k")
                name = hook_name_for(kind, layer)  # type: ignore[arg-type]
                hooks += [
                    (q, fixed(clean[q] + deltas[q] if name == q else clean[q])),
                    (k, fixed(clean[k] + deltas[k] if name == k else clean[k])),
                    (_attn(layer, "hook_attn_scores"), record(layer)),
                ]
            with torch.no_grad(), hooked(model, hooks):
                try:
                    model(tokens)
                except _Stop:
                    pass
            for layer in layers:
                base = _causal_softmax(clean[_attn(layer, "hook_attn_scores")])
                out[hook_name_for(kind, layer)] = _causal_softmax(scores[layer]) - base  # type: ignore[arg-type]
        return out

    @staticmethod
    def reduce(
        grad_pattern: Float[Tensor, "batch head q k"], change: Float[Tensor, "batch head q k"], n_units: int
    ) -> Float[Tensor, "batch units"]:
        """``sum dP/dA * (A' - A)`` per unit: a query head, or a key/value head summed over its query group.

        Query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``, as in TransformerLens and
        Hugging Face's ``repeat_kv``.
        """
        per_head = (grad_pattern.float() * change).sum((-1, -2))  # [batch, n_heads]
        return per_head.unflatten(1, (n_units, per_head.shape[1] // n_units)).sum(-1)


class _GradGate(torch.autograd.Function):
    """Identity forward; backward passes the gradient on, or zero when its layer is the dropped one."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, drop: GradDrop, layer: int) -> Tensor:
        ctx.drop, ctx.layer = drop, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return (torch.zeros_like(grad) if ctx.drop.dropped == ctx.layer else grad), None, None


class GradDrop:
    """Gates on every block's ``hook_attn_out``/``hook_mlp_out``: set ``dropped`` before a backward pass."""

    def __init__(self, n_layers: int) -> None:
        if n_layers < 2:
            raise ValueError(f"grad_drop averages over L - 1 blocks and needs a model with >= 2 blocks; got {n_layers}")
        self.n_layers = n_layers
        self.dropped: int | None = None

    def hooks(self) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
        def gate(layer: int) -> Callable[[Tensor, Any], Tensor]:
            return lambda act, hook: _GradGate.apply(act, self, layer) if act.requires_grad else act

        names = ("hook_attn_out", "hook_mlp_out")
        return [(f"blocks.{layer}.{n}", gate(layer)) for layer in range(self.n_layers) for n in names]


def atp_batch(
    model: HookedModel,
    plan: _Plan,
    batch: ProbeBatch,
    metric_values: Callable[[Tensor], Tensor],
    positions: tuple[int, ...] | None,
    *,
    qk: QKFix | None = None,
    grad_drop: GradDrop | None = None,
) -> tuple[dict[str, Tensor] | None, Tensor]:
    """Per-hook ``[batch, units]`` estimates of one batch (None where undefined) and the clean metric.

    ``metric_values(logits) -> [batch]``. Plain AtP without ``qk`` and ``grad_drop``.
    """
    leaves: dict[str, Tensor] = {}
    clean: dict[str, Tensor] = {}

    def leaf(name: str) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            clean[name] = act.detach()
            leaves[name] = torch.zeros_like(act, requires_grad=True)
            return act + leaves[name]

        return hook

    def capture(name: str) -> Callable[[Tensor, Any], None]:
        def hook(act: Tensor, hook: Any) -> None:
            clean[name] = act.detach()

        return hook

    graded = list(plan.names) + (qk.pattern_names() if qk else [])
    hooks = [(n, leaf(n)) for n in graded]
    hooks += [(n, capture(n)) for n in (qk.capture_names() if qk else []) if n not in graded]
    with hooked(model, hooks + (grad_drop.hooks() if grad_drop else [])):
        logits = model(batch.tokens)
    values = metric_values(logits)
    deltas = plan.deltas(model, batch, clean, positions)
    if deltas is None:
        return None, values.detach()
    changes: dict[str, Tensor] = {}
    if qk is not None:
        qk.check(clean)
        changes = qk.pattern_changes(model, batch.tokens, clean, deltas)

    def estimate(retain: bool) -> dict[str, Tensor]:
        grads = dict(zip(graded, torch.autograd.grad(values.sum(), [leaves[n] for n in graded],
                                                     retain_graph=retain, allow_unused=True), strict=True))  # fmt: skip
        out = {}
        for name in plan.names:
            if name in changes:  # a query/key hook under the QK fix: through the recomputed pattern
                layer = int(name.split(".")[1])
                g = grads[_attn(layer, "hook_pattern")]
                g = torch.zeros_like(changes[name]) if g is None else g
                out[name] = QKFix.reduce(g, changes[name], deltas[name].shape[2])
            else:
                g = grads[name]
                g = torch.zeros_like(deltas[name]) if g is None else g  # a hook that does not reach the metric
                out[name] = plan.reduce(name, g * deltas[name])
        return out

    if grad_drop is None:
        return estimate(retain=False), values.detach()
    total: dict[str, Tensor] = {}
    for layer in range(grad_drop.n_layers):
        grad_drop.dropped = layer
        try:
            scores = estimate(retain=layer < grad_drop.n_layers - 1)
        finally:
            grad_drop.dropped = None
        for name, s in scores.items():
            total[name] = total[name] + s.abs() if name in total else s.abs()
    return {name: s / (grad_drop.n_layers - 1) for name, s in total.items()}, values.detach()

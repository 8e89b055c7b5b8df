"""Fitting direction features from a probe set (no group labels needed).

For every site and layer asked for, the activations of each prompt and of its spurious
counterfactual are captured (at the last position, or at the positions where the two
differ) and the pair is oriented by the model's own output: the side with the larger
metric ``P`` (default: logit difference of the answer) is ``hi``. An estimator
(:mod:`icp_lens.directions.estimators`: ``diff-means``, ``leace``, ``probe``) turns the
pairs into write/read vectors. Then:

1. **Causal cue kept.** When the probes carry causal counterfactuals, the causal
   direction ``c`` (mean oriented difference between prompt and causal counterfactual)
   is measured, ``cos_causal = cos(a, c)`` is recorded, and with ``keep_causal="write"``
   (the default then) the write vector is made orthogonal to ``c``: the edit never moves
   an activation along the direction that carries the explicit cue.
2. **First position protected.** Real LMs park huge activations on the first (BOS)
   token, an attention sink every later position reads. Removing a direction there is
   what makes stream-wide edits explode perplexity. With ``protect_first`` (default: when
   the model prepends BOS) the read vector is constrained so that at every edit point
   ``b . (x_bos - mean) = 0``: in ``mean`` mode the BOS activations are left exactly
   unchanged.
3. **Means.** ``m = b . mean(x)`` at every edit point over the reference text (default:
   the probe prompts and their spurious counterfactuals; BOS excluded).

Every choice is an argument of :func:`fit_directions` (or a field of
:class:`DirectionFit`), recorded in ``DirectionSet.info``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from icp_lens.directions.core import Direction, DirectionSet
from icp_lens.directions.estimators import biorthogonal, diff_means, leace, orthogonal_to, probe_directions
from icp_lens.directions.intervene import edit_points, residual_writers
from icp_lens.features import Feature, parse_site
from icp_lens.hooks import hooked
from icp_lens.metrics import Metric, get_metric
from icp_lens.probeset import ProbeSet

__all__ = ["DirectionFit", "fit_directions", "DIRECTION_SOURCES"]

DIRECTION_SOURCES: tuple[str, ...] = ("diff-means", "leace", "probe")
_HOOKS = {"resid_pre": "blocks.{L}.hook_resid_pre", "attn_out": "blocks.{L}.hook_attn_out",
          "mlp_out": "blocks.{L}.hook_mlp_out", "z": "blocks.{L}.attn.hook_z"}  # fmt: skip


@dataclass(frozen=True)
class DirectionFit:
    """How to fit directions (see the module docstring); ``None`` fields mean "automatic"."""

    source: Literal["diff-means", "leace", "probe"] = "leace"
    sites: tuple[str, ...] = ("resid_pre",)
    layers: tuple[int, ...] | None = None
    rank: int = 1
    positions: Literal["last", "changed"] = "last"
    keep_causal: Literal["write", "none"] | None = None
    protect_first: bool | None = None
    shrinkage: float = 0.1
    reference: tuple[str, ...] | None = None
    batch_size: int = 32
    #: protecting the first position constrains the read vector; where that would make
    #: ``|b|`` exceed this (an ill-conditioned edit that amplifies rounding), the
    #: direction keeps its unprotected read and ``info["unprotected"]`` names it
    max_read_norm: float = 10.0
    #: LEACE's covariance: ``pairs`` (the pooled prompt/counterfactual activations) or
    #: ``reference`` (the reference text's activations at the site: the edit is then the
    #: least-squares one on ordinary text, which is what perplexity measures)
    whiten: Literal["pairs", "reference"] = "pairs"

    def __post_init__(self) -> None:
        if self.source not in DIRECTION_SOURCES:
            raise ValueError(f"Unknown direction source {self.source!r}; valid: {list(DIRECTION_SOURCES)}")
        if self.positions not in ("last", "changed"):
            raise ValueError(f"positions must be 'last' or 'changed', got {self.positions!r}")
        if self.keep_causal not in (None, "write", "none"):
            raise ValueError(f"keep_causal must be 'write' or 'none', got {self.keep_causal!r}")
        if self.whiten not in ("pairs", "reference"):
            raise ValueError(f"whiten must be 'pairs' or 'reference', got {self.whiten!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for site in self.sites:
            if site != "z":
                parse_site(site)


def _expand_sites(sites: Sequence[str], n_heads: int) -> list[str]:
    out: list[str] = []
    for s in sites:
        out += [f"z.{h}" for h in range(n_heads)] if s == "z" else [s]
    return out


def _site_act(store: dict[str, Tensor], site: str, layer: int) -> Tensor:
    name, head = parse_site(site)
    act = store[_HOOKS[name].format(L=layer)]
    return act if head is None else act[..., head, :]


def _run(model: Any, tokens: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    store: dict[str, Tensor] = {}

    def make(name: str):
        def fn(act: Tensor, hook: Any = None) -> None:
            store[name] = act.detach()

        return fn

    with torch.no_grad(), hooked(model, [(n, make(n)) for n in dict.fromkeys(names)]):
        logits = model(tokens)
    return logits[:, -1].float(), store


def _rows(act: Tensor, tokens: Tensor, other: Tensor, positions: str) -> tuple[Tensor, Tensor]:
    """(example index, position) pairs to read: the last position, or where the two prompts differ."""
    if positions == "last":
        n = act.shape[0]
        return torch.arange(n, device="cpu"), torch.full((n,), act.shape[1] - 1, device="cpu")  # as below
    idx = (tokens != other).nonzero()
    return idx[:, 0].cpu(), idx[:, 1].cpu()


def fit_directions(
    model: Any,
    probes: ProbeSet,
    fit: DirectionFit | None = None,
    *,
    metric: str | Metric = "logit_diff",
    **overrides: Any,
) -> DirectionSet:
    """Fit the directions ``fit`` asks for (``overrides`` replace its fields) on ``probes``.

    >>> dirs = fit_directions(bridge, probes, source="leace", sites=("resid_pre",), layers=(3,))
    >>> dirs.get("direction L3.0@resid_pre").cos_causal
    """
    fit = DirectionFit(**{**(asdict(fit) if fit is not None else {}), **overrides})
    if not any(e.spurious_counterfactual for e in probes.examples):
        raise ValueError("Fitting directions needs probe examples with a spurious_counterfactual (none has one)")
    metric_fn = get_metric(metric)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layers = list(range(n_layers)) if fit.layers is None else list(fit.layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range; valid layers 0..{n_layers - 1}")
    sites = _expand_sites(fit.sites, n_heads)
    keys = [(s, layer) for layer in layers for s in sites]
    names = [_HOOKS[parse_site(s)[0]].format(L=layer) for s, layer in keys]
    use_causal = fit.keep_causal != "none" and probes.has_causal
    keep_causal = fit.keep_causal or ("write" if probes.has_causal else "none")

    hi: dict[tuple[str, int], list[Tensor]] = {k: [] for k in keys}
    lo: dict[tuple[str, int], list[Tensor]] = {k: [] for k in keys}
    c_hi: dict[tuple[str, int], list[Tensor]] = {k: [] for k in keys}
    c_lo: dict[tuple[str, int], list[Tensor]] = {k: [] for k in keys}
    first: Tensor | None = None
    device = next(model.parameters()).device
    for batch in probes.batches(fit.batch_size, device=device):
        if first is None:
            first = batch.tokens[0, 0]
        if batch.spurious is None:  # examples without a spurious counterfactual teach nothing here
            continue
        logits, clean = _run(model, batch.tokens, names)
        p = metric_fn(logits, batch, logits)
        runs = [("spurious", batch.spurious, hi, lo)]
        if use_causal and batch.causal is not None:
            runs.append(("causal", batch.causal, c_hi, c_lo))
        for _, other_tokens, dst_hi, dst_lo in runs:
            if other_tokens.shape != batch.tokens.shape:
                raise ValueError("Fitting directions needs counterfactuals of the prompt's length (cf_length='strict')")
            logits_o, other = _run(model, other_tokens, names)
            sign = torch.sign(p - metric_fn(logits_o, batch, logits)).cpu()
            for key in keys:
                a, b = _site_act(clean, *key), _site_act(other, *key)
                ex, pos = _rows(a, batch.tokens.cpu(), other_tokens.cpu(), fit.positions)
                s = sign[ex]
                keep = s != 0
                xa, xb = a.cpu()[ex, pos].double()[keep], b.cpu()[ex, pos].double()[keep]
                up = (s[keep] > 0)[:, None]
                dst_hi[key].append(torch.where(up, xa, xb))
                dst_lo[key].append(torch.where(up, xb, xa))

    writers = residual_writers(model)
    # reference statistics: the mean at every edit point and the first-position activation
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    prepends = first is not None and bos is not None and int(first) == int(bos)
    protect = prepends if fit.protect_first is None else fit.protect_first
    texts = list(fit.reference) if fit.reference is not None else [
        t for e in probes.examples for t in (e.prompt, e.spurious_counterfactual) if t
    ]  # fmt: skip
    points = sorted({p for s, layer in keys for p in _points(s, layer, writers)})
    fit_hooks = sorted(set(names)) if fit.whiten == "reference" else []
    means, first_acts, covs = _reference_stats(
        model, texts, points, skip_first=prepends, batch_size=fit.batch_size, second=fit_hooks
    )

    directions: list[Direction] = []
    skipped: list[str] = []
    unprotected: list[str] = []
    for key in keys:
        site, layer = key
        H, L = torch.cat(hi[key]) if hi[key] else None, torch.cat(lo[key]) if lo[key] else None
        if H is None or len(H) < 2:
            skipped.append(f"{site}@L{layer}: fewer than 2 pairs changed the output")
            continue
        sigma = None
        if fit.whiten == "reference":
            hook = _HOOKS[parse_site(site)[0]].format(L=layer)
            cov = covs[hook] if parse_site(site)[1] is None else covs[hook][parse_site(site)[1]]
            d = cov.shape[0]
            eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
            sigma = (1 - fit.shrinkage) * cov + fit.shrinkage * torch.trace(cov) / d * eye
        try:
            A, B = _estimate(fit, H, L, sigma)
        except ValueError as err:
            skipped.append(f"{site}@L{layer}: {err}")
            continue
        cos = [math.nan] * len(A)
        if use_causal and c_hi[key]:
            c = (torch.cat(c_hi[key]) - torch.cat(c_lo[key])).mean(0)
            if c.norm() > 0:
                cos = [float(torch.nn.functional.cosine_similarity(a, c, dim=0)) for a in A]
                if keep_causal == "write":
                    A, B = orthogonal_to(A, B, c[None])
                    if fit.source != "leace":
                        A, B = biorthogonal(A, A)
        pts = _points(site, layer, writers)
        head = parse_site(site)[1]

        def at(stat: Tensor, head: int | None = head) -> Tensor:
            return stat if head is None else stat[head]

        if protect:
            gaps = torch.stack([at(first_acts[p]) - at(means[p]) for p in pts])
            protected = _protect(A, B, gaps)
            if float(protected.norm(dim=1).max()) <= fit.max_read_norm:
                B = protected
            else:
                unprotected.append(f"{site}@L{layer}")
        for k in range(len(A)):
            m = torch.stack([B[k] @ at(means[p]) for p in pts])
            feature = Feature("direction", layer, k, site)
            directions.append(Direction(feature, A[k], B[k], m, fit.source.replace("-", "_"), cos[k]))
    info = {**asdict(fit), "reference": len(texts), "keep_causal": keep_causal, "protect_first": protect,
            "skipped": skipped, "unprotected": unprotected,
            "metric": getattr(metric_fn, "__name__", str(metric))}  # fmt: skip
    if not directions:
        raise ValueError("No direction could be fitted: " + "; ".join(skipped[:5]))
    return DirectionSet(tuple(directions), writers, info)


def _points(site: str, layer: int, writers: Sequence[str]) -> tuple[str, ...]:
    # a placeholder direction: only its feature's site matters here, its vectors are never used
    one, zero = torch.ones(1, device="cpu"), torch.zeros(1, device="cpu")
    probe = Direction(Feature("direction", layer, 0, site), one, one, zero)
    return edit_points(probe, writers)


def _estimate(fit: DirectionFit, H: Tensor, L: Tensor, sigma: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if fit.source == "diff-means":
        return diff_means(H, L, fit.rank)
    if fit.source == "leace":
        return leace(H, L, fit.rank, shrinkage=fit.shrinkage, sigma=sigma)
    return probe_directions(H, L, fit.rank)


def _protect(A: Tensor, B: Tensor, gaps: Tensor) -> Tensor:
    """Reads with ``b . gap = 0`` for every gap (first position minus mean), keeping ``B A^T = I``."""
    q, _ = torch.linalg.qr(gaps.double().T)
    q = q[:, : min(gaps.shape[0], A.shape[1] - A.shape[0])]
    reads = B - (B @ q) @ q.T
    return biorthogonal(A, reads)[1]


@torch.no_grad()
def _reference_stats(
    model: Any,
    texts: Sequence[str],
    points: Sequence[str],
    *,
    skip_first: bool,
    batch_size: int,
    second: Sequence[str] = (),
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Mean activation (fp64) at each hook point over ``texts``, the first-position activation,
    and the covariance at the ``second`` hooks (per head for ``hook_z``)."""
    names = sorted(set(points) | set(second))
    sums: dict[str, Tensor] = {}
    squares: dict[str, Tensor] = {}
    count = 0
    first: dict[str, Tensor] = {}
    by_len: dict[int, list[Tensor]] = {}
    for t in texts:
        tok = model.to_tokens(t)[0]
        by_len.setdefault(len(tok), []).append(tok)
    for _, toks in sorted(by_len.items()):
        for start in range(0, len(toks), batch_size):
            tokens = torch.stack(toks[start : start + batch_size]).to(next(model.parameters()).device)
            _, store = _run(model, tokens, names)
            for n in names:
                act = store[n].double().cpu()
                if n not in first:
                    first[n] = act[0, 0]
                body = act[:, 1:] if skip_first else act
                flat = body.reshape(-1, *act.shape[2:])
                sums[n] = sums.get(n, 0) + flat.sum(0)
                if n in second:
                    per = flat if flat.ndim == 2 else flat.transpose(0, 1)  # hook_z: [heads, n, d_head]
                    squares[n] = squares.get(n, 0) + per.transpose(-1, -2) @ per
            count += tokens.shape[0] * (tokens.shape[1] - (1 if skip_first else 0))
    means = {n: sums[n] / max(count, 1) for n in names}
    covs = {}
    for n in second:
        mu = means[n] if means[n].ndim == 1 else means[n]
        outer = torch.outer(mu, mu) if mu.ndim == 1 else mu[:, :, None] * mu[:, None, :]
        covs[n] = squares[n] / max(count, 1) - outer
    return _per_point(means, points), _per_point(first, points), covs


def _per_point(stats: dict[str, Tensor], points: Sequence[str]) -> dict[str, Tensor]:
    return {p: stats[p] for p in points}

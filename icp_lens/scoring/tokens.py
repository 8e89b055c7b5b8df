"""Scoring token-embedding features: which input tokens carry the spurious attribute?

A *token-embedding feature* is one vocabulary token's input-embedding row. The
intervention that scores it is a patch from a counterfactual: at the positions where the
prompt holds token ``t`` and the counterfactual holds something else, the embedding is
replaced by the counterfactual's embedding there (every other position keeps the
prompt's). With ``P`` the metric (default: the logit difference of the answer against
its alternatives at the last position)::

    dP_spurious(x, t) = P(M(x | embed[pos: x_pos = t, x_pos != x'_pos] = embed(x'))) - P(M(x))

with ``x'`` the spurious counterfactual, and ``dP_causal`` the same with the causal one.
The token's score is ``S(t) = E_x |dP_spurious(x, t)|`` over the probes with a spurious
counterfactual (probes where ``t`` is not at a differing position contribute 0),
``C(t)`` the same under the causal counterfactual, and ``selectivity = S / (S + C)``:
a token the spurious counterfactual swaps and the causal one leaves alone (a planted
tag) scores 1, a sentiment word the causal counterfactual swaps scores 0. Only tokens at
a position where some counterfactual differs can have an effect; the rest are not
listed. The scores are exact (one forward pass per token and batch row that holds it,
packed into batches) and use no group labels.

Selection (:meth:`TokenScoreTable.icp_selection`, :func:`icp_select_tokens`) is the
threshold rule ``S > tau`` with ``tau = min_share * max S`` and a selectivity bar. The
tokens a spurious counterfactual swaps come in sets (``wow``/``meh``) that only remove
the attribute together, so this is a threshold on the ranking, not a one-at-a-time
acceptance. Pruning them is :func:`icp_lens.pruning.make_plan` with ``tokens=``
(zero or mean row; :func:`token_ablation_mode` picks the one that keeps the probe
accuracy higher)::

    from icp_lens.scoring import score_tokens
    table = score_tokens(bridge, probes)          # a TokenScoreTable, one row per token
    table.top(5)
    ids = table.icp_selection()
    plan = make_plan(bridge, [], tokens=ids, token_mode=token_ablation_mode(bridge, probes, ids),
                     reference=probes)

Works on a ``TransformerBridge`` or ``HookedTransformer`` (through ``hook_embed``) and on
a Hugging Face model (through its input-embedding module; give a ``ProbeSet`` made for
the same tokenization, or ``ProbeExample``s and the ``tokenizer``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from icp_lens.metrics import Metric, get_metric
from icp_lens.probeset import ProbeBatch, ProbeSet
from icp_lens.pruning.plan import TokenRow
from icp_lens.pruning.tokens import EMBED_HOOK, EmbeddingSite, embedding_mean, replace_tokens
from icp_lens.scoring.spuriousness import bootstrap_ci

__all__ = [
    "TOKEN_COLUMNS",
    "TokenScoreTable",
    "score_tokens",
    "icp_select_tokens",
    "token_ablation_mode",
    "embedding_mean",
    "probe_accuracy",
]

#: The columns of a token score table, in order.
TOKEN_COLUMNS: tuple[str, ...] = (
    "kind",
    "index",
    "token",
    "feature",
    "hook_name",
    "score",
    "ci_low",
    "ci_high",
    "causal",
    "selectivity",
    "n_examples",
    "n_positions",
    "exact",
)


@dataclass(frozen=True)
class TokenScoreTable:
    """Token-embedding scores, one row per token (sorted by ``score``, most spurious first).

    Columns: ``kind`` (``"token"``), ``index`` (the token id), ``token`` (its text),
    ``feature`` (``"token <id> ('<text>')"``), ``hook_name`` (``hook_embed``), ``score``
    (``S``, mean |dP| under the spurious counterfactual) with its bootstrap interval
    ``ci_low``/``ci_high``, ``causal`` (``C``, the same under the causal counterfactual),
    ``selectivity`` (``S / (S + C)``; NaN where both are 0), ``n_examples`` (probes in
    which the token was patched, either counterfactual), ``n_positions`` (positions
    patched), ``exact`` (always True).
    """

    frame: pd.DataFrame

    def __post_init__(self) -> None:
        missing = [c for c in ("kind", "index", "score", "selectivity") if c not in self.frame.columns]
        if missing:
            raise ValueError(f"A token score table needs the columns {list(TOKEN_COLUMNS)}; missing {missing}")
        bad = sorted(set(self.frame["kind"]) - {"token"})
        if bad:
            raise ValueError(f"A token score table holds kind 'token' only, got {bad}")
        frame = self.frame.copy()
        frame["index"] = frame["index"].astype(int)
        order = ["score", "causal", "index"] if "causal" in frame else ["score", "index"]
        frame = frame.sort_values(order, ascending=[False] + [True] * (len(order) - 1)).reset_index(drop=True)
        object.__setattr__(self, "frame", frame)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def token_ids(self) -> list[int]:
        """Every listed token id, most spurious first."""
        return [int(i) for i in self.frame["index"]]

    def top(self, n: int = 10) -> pd.DataFrame:
        return self.frame.head(n)

    def select(
        self, *, threshold: float | None = None, top_k: int | None = None, min_selectivity: float | None = None
    ) -> list[int]:
        """Token ids with ``score > threshold`` and ``selectivity >= min_selectivity``, at most ``top_k``."""
        if threshold is None and top_k is None:
            raise ValueError("Give threshold=..., top_k=... or both")
        frame = self.frame[self.frame["score"] > 0]
        if min_selectivity is not None:
            frame = frame[frame["selectivity"] >= min_selectivity]
        if threshold is not None:
            frame = frame[frame["score"] > threshold]
        ids = [int(i) for i in frame["index"]]
        return ids[:top_k] if top_k is not None else ids

    def icp_selection(self, *, min_selectivity: float | None = 0.5, min_share: float = 0.1) -> list[int]:
        """The ICP rule: ``S >= min_share * max S`` (and ``S > 0``) and ``selectivity >= min_selectivity``.

        Without causal counterfactuals the selectivity is NaN, which fails any bar: pass
        ``min_selectivity=None`` to drop it (and accept the risk of pruning a causal token).
        """
        return [
            int(r["token_id"])
            for r in self.decisions(min_selectivity=min_selectivity, min_share=min_share)
            if r["accepted"]
        ]

    def decisions(self, *, min_selectivity: float | None = 0.5, min_share: float = 0.1) -> list[dict[str, Any]]:
        """One record per token: its scores and whether :meth:`icp_selection` accepts it."""
        if not 0 <= min_share <= 1:
            raise ValueError(f"min_share must be in [0, 1], got {min_share}")
        if self.frame.empty:
            return []
        tau = min_share * float(self.frame["score"].max())
        out = []
        for row in self.frame.to_dict("records"):
            s, sel = float(row["score"]), float(row["selectivity"])
            ok = s > 0 and s >= tau and (min_selectivity is None or sel >= min_selectivity)  # NaN fails a bar
            out.append(
                {
                    "token_id": int(row["index"]),
                    "token": row.get("token"),
                    "spurious": s,
                    "causal": float(row.get("causal", float("nan"))),
                    "selectivity": sel,
                    "accepted": bool(ok),
                }
            )
        return out

    def save(self, path: str | Path) -> Path:
        """Write the frame as CSV (or parquet, by suffix)."""
        path = Path(path)
        if path.suffix == ".parquet":
            self.frame.to_parquet(path, index=False)
        else:
            self.frame.to_csv(path, index=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenScoreTable:
        path = Path(path)
        frame = (
            pd.read_parquet(path)
            if path.suffix == ".parquet"
            else pd.read_csv(path, keep_default_na=False, na_values=[""])
        )
        return cls(frame)


class _Encoder:
    """``to_tokens`` for a plain tokenizer, so a ``ProbeSet`` can be made for an HF model."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def to_tokens(self, text: str) -> Tensor:
        return torch.tensor([self.tokenizer(text, add_special_tokens=True)["input_ids"]], device="cpu")  # read as ids


def _probe_set(model: Any, probes: Any, tokenizer: Any) -> ProbeSet:
    if isinstance(probes, ProbeSet):
        return probes
    if hasattr(model, "hook_dict"):
        return ProbeSet(model, list(probes))
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("Scoring an HF model on ProbeExamples needs tokenizer=... (or pass a ProbeSet)")
    return ProbeSet(_Encoder(tok), list(probes))


def _rows(batch: ProbeBatch, idx: Tensor) -> ProbeBatch:
    """The batch restricted to rows ``idx`` (only what a metric reads)."""
    return dataclasses.replace(
        batch,
        index=batch.index[idx],
        tokens=batch.tokens[idx],
        answer=batch.answer[idx],
        alternatives=batch.alternatives[idx],
        spurious=None if batch.spurious is None else batch.spurious[idx],
        causal=None if batch.causal is None else batch.causal[idx],
        causal_answer=None if batch.causal_answer is None else batch.causal_answer[idx],
        groups=tuple(batch.groups[i] for i in idx.tolist()),
    )


@torch.no_grad()
def score_tokens(
    model: Any,
    probes: ProbeSet | Sequence[Any],
    *,
    tokenizer: Any = None,
    metric: str | Metric = "logit_diff",
    batch_size: int = 64,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> TokenScoreTable:
    """Score every token at a position some counterfactual changes (see the module docstring).

    ``model``: a ``TransformerBridge``, ``HookedTransformer`` or HF model; ``probes``: a
    ``ProbeSet`` (its token ids are used as they are) or ``ProbeExample``s (tokenized for
    ``model``; an HF model needs ``tokenizer``). Patched runs are packed into forward
    passes of at most ``batch_size`` rows. ``n_boot`` bootstrap resamples give the score's
    interval (0 skips it). Counterfactuals must align position by position.
    """
    ps = _probe_set(model, probes, tokenizer)
    metric_fn = get_metric(metric)
    site = EmbeddingSite(model)
    device = site.device
    n = len(ps)
    # the batches and the per-example results stay on the CPU; each pass moves its tokens to the model
    effects: dict[str, dict[int, Tensor]] = {"spurious": {}, "causal": {}}
    present = {name: torch.zeros(n, dtype=torch.bool, device="cpu") for name in ("spurious", "causal")}
    patched_in: dict[int, Tensor] = {}
    positions: dict[int, int] = {}
    batches = list(ps.batches(batch_size, device="cpu"))
    for batch in tqdm(batches, desc="token scores", disable=not progress):
        tokens = batch.tokens.to(device)
        clean = site.logits(tokens)[:, -1]
        base = metric_fn(clean, batch, clean).float()
        for name in ("spurious", "causal"):
            cf = getattr(batch, name)
            if cf is None:
                continue
            if cf.shape != tokens.shape:
                raise ValueError(
                    f"score_tokens needs {name} counterfactuals of the prompt's token length (position-aligned)"
                )
            cf = cf.to(device)
            present[name][batch.index] = True
            other = site.embed(cf)
            differs = cf != tokens
            jobs: list[tuple[int, Tensor, Tensor]] = []  # token, rows holding it, where to patch in those rows
            for t in torch.unique(tokens[differs]).tolist():
                where = differs & (tokens == t)
                rows = where.any(1).nonzero().squeeze(1)
                jobs.append((t, rows, where[rows]))
                positions[t] = positions.get(t, 0) + int(where.sum())
            none = torch.zeros(0, dtype=torch.long, device=device)
            all_rows = torch.cat([rows for _, rows, _ in jobs]) if jobs else none
            all_masks = torch.cat([m for _, _, m in jobs]) if jobs else torch.zeros(0, *tokens.shape[1:], device=device)
            owners = [t for t, rows, _ in jobs for _ in range(len(rows))]
            for start in range(0, len(all_rows), batch_size):
                rows = all_rows[start : start + batch_size]
                mask = all_masks[start : start + batch_size].bool()
                patch = other[rows]
                with site.replacing(lambda act, mask=mask, patch=patch: torch.where(mask[..., None], patch, act)):
                    logits = site.logits(tokens[rows])[:, -1]
                sub = _rows(batch, rows.cpu())
                effect = (metric_fn(logits, sub, clean[rows]).float() - base[rows]).cpu()
                for k, t in enumerate(owners[start : start + batch_size]):
                    i = int(sub.index[k])
                    effects[name].setdefault(t, torch.zeros(n, device="cpu"))[i] = effect[k]
                    patched_in.setdefault(t, torch.zeros(n, dtype=torch.bool, device="cpu"))[i] = True
    if not bool(present["spurious"].any()):
        raise ValueError("Token scores need probe examples with a spurious counterfactual; none has one")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    ids = sorted(set(effects["spurious"]) | set(effects["causal"]))
    zeros, empty = torch.zeros(n, device="cpu"), torch.zeros(0, n, device="cpu")
    spurious = torch.stack([effects["spurious"].get(t, zeros) for t in ids]) if ids else empty
    causal = torch.stack([effects["causal"].get(t, zeros) for t in ids]) if ids else empty
    s_values = spurious[:, present["spurious"]].abs()
    s = s_values.mean(1)
    n_causal = int(present["causal"].sum())
    c = causal[:, present["causal"]].abs().mean(1) if n_causal else torch.full((len(ids),), float("nan"), device="cpu")
    low, high = bootstrap_ci(s_values, n_boot=n_boot, seed=seed)
    total = s + c
    sel = torch.where(total > 1e-12, s / total.clamp_min(1e-12), torch.full_like(s, float("nan")))
    names = tok.convert_ids_to_tokens(ids) if tok is not None and ids else [str(t) for t in ids]
    frame = pd.DataFrame(
        {
            "kind": "token",
            "index": ids,
            "token": names,
            "feature": [f"token {t} ({name!r})" for t, name in zip(ids, names, strict=True)],
            "hook_name": EMBED_HOOK,
            "score": s.tolist(),
            "ci_low": low.tolist(),
            "ci_high": high.tolist(),
            "causal": c.tolist(),
            "selectivity": sel.tolist(),
            "n_examples": [int(patched_in[t].sum()) for t in ids],
            "n_positions": [positions[t] for t in ids],
            "exact": True,
        },
        columns=list(TOKEN_COLUMNS),
    )
    return TokenScoreTable(frame)


def icp_select_tokens(
    model: Any,
    probes: ProbeSet | Sequence[Any],
    *,
    min_selectivity: float | None = 0.5,
    min_share: float = 0.1,
    tokenizer: Any = None,
    trace: list[dict[str, Any]] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[int]:
    """Token-embedding features to prune, without group labels: :func:`score_tokens`, then the ICP rule.

    Keeps the tokens with selectivity at least ``min_selectivity`` and a spurious score at
    least ``min_share`` of the top token's (``tau = min_share * max S``). ``trace`` (a
    list) receives one record per scored token (its scores and ``accepted``).
    """
    table = score_tokens(model, probes, tokenizer=tokenizer, batch_size=batch_size, n_boot=0, progress=progress)
    records = table.decisions(min_selectivity=min_selectivity, min_share=min_share)
    if trace is not None:
        trace.extend(records)
    return [r["token_id"] for r in records if r["accepted"]]


@torch.no_grad()
def probe_accuracy(model: Any, probes: ProbeSet, *, rows: Sequence[TokenRow] = (), batch_size: int = 256) -> float:
    """Share of probes whose answer beats its alternatives (logit difference > 0), ``rows`` replaced at run time."""
    site = EmbeddingSite(model)
    correct = total = 0
    for batch in probes.batches(batch_size, device=site.device):
        tokens = batch.tokens
        with site.replacing(lambda act, tokens=tokens: replace_tokens(act, tokens, rows)):
            logits = site.logits(tokens)[:, -1]
        correct += int((get_metric("logit_diff")(logits, batch, None) > 0).sum())
        total += batch.size
    return correct / total


def token_ablation_mode(
    model: Any, probes: ProbeSet | Sequence[Any], tokens: Sequence[int], *, tokenizer: Any = None
) -> Literal["zero", "mean"]:
    """Zero or mean for the pruned embedding rows: whichever keeps the probe accuracy higher.

    Neither value is a neutral input by construction (the model never saw either in
    training), and which one the model reads as "no token here" differs between models;
    the probe prompts (task labels only, no group labels) decide. Ties go to mean.
    """
    ps = _probe_set(model, probes, tokenizer)
    ids = [int(t) for t in tokens]
    if not ids:
        return "mean"
    mean = tuple(embedding_mean(model, ps).double().tolist())
    acc = {
        mode: probe_accuracy(model, ps, rows=[TokenRow(t, None if mode == "zero" else mean) for t in ids])
        for mode in ("mean", "zero")
    }
    return "zero" if acc["zero"] > acc["mean"] else "mean"

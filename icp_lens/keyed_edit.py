"""Keyed MLP edits: remove a shortcut where it is written, in closed form, with a guard.

A direction edit (:mod:`icp_lens.directions`) removes a vector from *every* input: on a real
model the spurious direction is close to the causal one (cosine 0.76-0.89 for gender on
SmolLM2) and to ordinary features, so projecting it out everywhere costs perplexity before
it cuts much of the gap. A *keyed* edit acts only where the spurious value is in the input.
It treats an MLP's output matrix ``W`` (``d_model x d_mlp``) as a linear associative memory
(Geva et al. 2021; ROME / MEMIT, Meng et al. 2022-23; DAMA, Limisiewicz et al. 2024): the
MLP's hidden activation ``k`` at a position is a *key*, ``W k`` the *value* it writes into
the residual stream. The edit ``W + dW`` asks:

* **move** (the pairs): at every position from the first token where a prompt and its
  spurious counterfactual differ, the residual stream after the block should become the
  counterfactual's (``target="counterfactual"``: e.g. "the nurse" -> "the person", the
  counterfactual being a neutral value) or the pair's mean (``target="mean"``: both
  values of a group swap meet in the middle), ``dW k_i = r_i``;
* **keep** (the guard): prompts whose answer legitimately depends on the attribute (the
  explicit cue, "the woman"; the pairs' causal counterfactuals) keep their outputs,
  ``dW k = 0`` at every position, with weight ``guard_weight``;
* **retain** (ordinary text): ``dW k = 0`` on the keys of plain text, in the least-squares
  sense, with weight ``retain_weight`` (the covariance guard of MEMIT / DAMA).

Each term is normalised by its number of keys, so the weights are ratios to the move
term. The minimiser is closed form, ``dW = R^T K (K^T K + g K_g^T K_g + l K_r^T K_r)^-1``
(one ``d_mlp x d_mlp`` solve per layer, in float64), and the edited model is an ordinary
checkpoint of the same shapes. Several layers are edited one after the other, each on the
model the previous edits made (MEMIT's order). ``rank`` restricts the targets to their
top singular directions (a smaller, lower-rank edit).

What it does and does not do, measured (``benchmarks/results/keyed_edit_cv.md``): on
SmolLM2-135M's profession -> pronoun shortcut, fitted on neutral swaps ("the nurse" -> "the
person") of the seen professions, with layer and retain weight chosen by the command's own
cross-validation over those professions (:mod:`icp_lens.keyed_choice`, ``icp-lens edit
--cv-layers``), it cuts the held-out gap (other professions, other templates) by 64% at
+2.3% perplexity, explicit cues intact; the pair recipe's fine-tune reaches 74-76% on the
same split. The keys of unseen professions share only part of their direction with the
fitted ones, and every setting trades gap cut against perplexity on other text. On planted
lexical shortcuts it closes the whole worst-group gap; on a tag read by attention (tag x
Llama) 21% (setting chosen without labels) to 35% (chosen on labelled validation prompts).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from icp_lens.encoding import bos_first
from icp_lens.hooks import module_hooks
from icp_lens.probes import ProbeExample
from icp_lens.pruning.arch import _get, arch_spec, layer_module

__all__ = ["KEYED_TARGETS", "KeyCache", "KeyedTarget", "KeyedEditStats", "keyed_edit", "mlp_keys"]

KeyedTarget = Literal["counterfactual", "mean"]
KEYED_TARGETS: tuple[str, ...] = ("counterfactual", "mean")


@dataclass(frozen=True)
class KeyedEditStats:
    """What :func:`keyed_edit` did: per edited layer, in order.

    ``n_pairs`` pairs used (``n_skipped`` dropped: prompt and counterfactual of different
    token lengths, or identical); ``n_keys`` move keys, ``n_guard`` / ``n_retain`` guard and
    retain keys (tokens) per layer; ``fit_residual`` = ``|K dW^T - R| / |R|`` on the move
    keys (0: every target met; 1: none); ``update_norm`` = ``|dW|_F / |W|_F``.
    """

    layers: tuple[int, ...]
    target: str
    n_pairs: int
    n_skipped: int
    n_keys: tuple[int, ...]
    n_guard: tuple[int, ...]
    n_retain: tuple[int, ...]
    fit_residual: tuple[float, ...]
    update_norm: tuple[float, ...]
    changed_parameters: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _mlp_out(model: nn.Module, layer: int) -> tuple[nn.Module, bool]:
    spec = arch_spec(model)
    return _get(layer_module(model, layer), spec.mlp_out), spec.conv1d


def _capturing(model: nn.Module, layer: int, store: dict[str, Tensor]) -> Any:
    """``store["k"]``: the MLP output matrix's input; ``store["h"]``: the block's output (residual stream)."""
    out, _ = _mlp_out(model, layer)

    def keep_key(module: nn.Module, args: tuple[Any, ...]) -> None:
        store["k"] = args[0].detach()

    def keep_resid(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        store["h"] = (output[0] if isinstance(output, tuple) else output).detach()

    return module_hooks(pre=[(out, keep_key)], post=[(layer_module(model, layer), keep_resid)])


@torch.no_grad()
def mlp_keys(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int,
    *,
    max_tokens: int = 128,
    batch_size: int = 64,
    desc: str | None = None,
) -> tuple[list[Float[Tensor, "pos d_mlp"]], list[Float[Tensor, "pos d_model"]]]:
    """Per text (BOS first, cut to ``max_tokens``): the keys of layer ``layer``'s MLP and the residual after the block.

    Texts of equal token length run as one batch (no padding, so no position sees another's
    tokens); results are float32 on the CPU, in the order of ``texts``.
    """
    device = next(model.parameters()).device
    encoded = [ids[:max_tokens] for ids in bos_first(tokenizer, texts, purpose="a keyed edit")]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    chunks = [idx[s : s + batch_size] for idx in by_len.values() for s in range(0, len(idx), batch_size)]
    keys: list[Tensor] = [torch.empty(0, device="cpu")] * len(encoded)
    resid: list[Tensor] = [torch.empty(0, device="cpu")] * len(encoded)
    store: dict[str, Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with _capturing(model, layer, store):
            for chunk in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
                model(torch.tensor([encoded[i] for i in chunk], device=device))
                k, h = store["k"].float().cpu(), store["h"].float().cpu()
                for row, i in enumerate(chunk):
                    keys[i], resid[i] = k[row], h[row]
    finally:
        model.train(was_training)
    return keys, resid


#: (layer, text) -> (keys, residual after the block) of one unedited model, see ``keyed_edit``
KeyCache = dict[tuple[int, str], tuple[Tensor, Tensor]]


def _cached_keys(
    model: nn.Module, tokenizer: Any, texts: list[str], layer: int, cache: KeyCache | None, **kwargs: Any
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`mlp_keys` of ``texts``, computing only those ``cache`` lacks (all of them without a cache)."""
    if cache is None:
        return mlp_keys(model, tokenizer, texts, layer, **kwargs)
    missing = [t for t in dict.fromkeys(texts) if (layer, t) not in cache]
    if missing:
        ks, hs = mlp_keys(model, tokenizer, missing, layer, **kwargs)
        for text, k, h in zip(missing, ks, hs, strict=True):
            cache[(layer, text)] = (k, h)
    return [cache[(layer, t)][0] for t in texts], [cache[(layer, t)][1] for t in texts]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def _move_targets(
    encoded: list[tuple[list[int], list[int]]],
    keys: tuple[list[Tensor], list[Tensor]],
    resid: tuple[list[Tensor], list[Tensor]],
    target: str,
) -> tuple[Tensor, Tensor]:
    """Stacked move keys ``K`` and their targets ``R`` (what ``dW k`` should add)."""
    K, R = [], []
    for j, (a, b) in enumerate(encoded):
        start = _first_difference(a, b)
        assert start is not None
        ka, kb, ha, hb = keys[0][j][start:], keys[1][j][start:], resid[0][j][start:], resid[1][j][start:]
        if target == "counterfactual":
            K.append(ka)
            R.append(hb - ha)
        else:
            mid = (ha + hb) / 2
            K += [ka, kb]
            R += [mid - ha, mid - hb]
    return torch.cat(K).double(), torch.cat(R).double()


def keyed_edit(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[ProbeExample],
    *,
    layers: Sequence[int],
    guard: Sequence[str] = (),
    retain: Sequence[str] = (),
    target: str = "counterfactual",
    guard_weight: float = 1.0,
    retain_weight: float = 3.0,
    rank: int | None = None,
    max_tokens: int = 128,
    batch_size: int = 64,
    progress: bool = True,
    key_cache: KeyCache | None = None,
) -> KeyedEditStats:
    """Edit ``model``'s MLP output matrices at ``layers`` in place (see the module docstring).

    ``pairs``: probe examples with a ``spurious_counterfactual`` of the same token length
    (others are skipped and counted); their ``causal_counterfactual`` prompts join
    ``guard``. ``guard``: prompts whose outputs must not move (explicit-cue prompts);
    ``retain``: ordinary text whose outputs should not move (cut to ``max_tokens``).
    ``target``: ``"counterfactual"`` (the prompt becomes its counterfactual: use neutral
    counterfactuals) or ``"mean"`` (both sides of each pair move to its mean). ``rank``:
    keep only the targets' top-``rank`` singular directions. Returns the statistics; the
    model's weights are changed (its dtype and device kept; the solve runs in float64 on
    the CPU).

    ``key_cache``: a dict shared by calls on the *same unedited model* (as the
    cross-validation of :mod:`icp_lens.keyed_choice` makes them, restoring the weights
    between calls). It holds each text's keys and residuals per layer, and is read and
    filled only for layers that no earlier edit of this call can reach (below every layer
    edited so far), so the statistics equal those of a call without it.
    """
    if target not in KEYED_TARGETS:
        raise ValueError(f"target must be one of {KEYED_TARGETS}, got {target!r}")
    if not layers:
        raise ValueError("keyed_edit needs at least one layer")
    if guard_weight < 0 or retain_weight < 0:
        raise ValueError(f"guard_weight and retain_weight must be >= 0, got {guard_weight}, {retain_weight}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 (or None for the full targets), got {rank}")
    for layer in layers:
        layer_module(model, layer)  # range check with the valid range in the message
    start_time = time.perf_counter()
    usable, encoded, skipped = [], [], 0
    for ex in pairs:
        if ex.spurious_counterfactual is None:
            skipped += 1
            continue
        a, b = bos_first(tokenizer, [ex.prompt, ex.spurious_counterfactual], purpose="a keyed edit")
        if len(a) != len(b) or _first_difference(a, b) is None or len(a) > max_tokens:
            skipped += 1
            continue
        usable.append(ex)
        encoded.append((a, b))
    if not usable:
        raise ValueError(
            f"keyed_edit: none of the {len(pairs)} pairs has a spurious counterfactual of the prompt's token length"
        )
    guard_texts = list(guard) + [ex.causal_counterfactual for ex in usable if ex.causal_counterfactual]
    stats: dict[str, list[Any]] = {k: [] for k in ("n_keys", "n_guard", "n_retain", "fit_residual", "update_norm")}
    changed = 0
    lowest_edited = float("inf")
    for layer in layers:
        desc = f"keyed edit, layer {layer}" if progress else None
        cache = key_cache if layer < lowest_edited else None  # an edit below changes this layer's keys

        def keys(texts: list[str], desc: str | None = None, layer: int = layer, cache: KeyCache | None = cache):
            return _cached_keys(model, tokenizer, texts, layer, cache, max_tokens=max_tokens, batch_size=batch_size,
                                desc=desc)  # fmt: skip

        kp, hp = keys([ex.prompt for ex in usable], desc)
        kc, hc = keys([ex.spurious_counterfactual for ex in usable])  # type: ignore[misc]
        K, R = _move_targets(encoded, (kp, kc), (hp, hc), target)
        if rank is not None:
            top = torch.linalg.svd(R, full_matrices=False).Vh[:rank]
            R = R @ top.T @ top
        A = K.T @ K
        n_guard = n_retain = 0
        for texts, weight, name in ((guard_texts, guard_weight, "guard"), (list(retain), retain_weight, "retain")):
            if not texts or weight == 0:
                continue
            ks, _ = keys(texts)
            G = torch.cat(ks).double()  # BOS included: its output reaches every later position
            if name == "guard":
                n_guard = G.shape[0]
            else:
                n_retain = G.shape[0]
            if G.shape[0]:
                A += weight * (K.shape[0] / G.shape[0]) * (G.T @ G)
        A += 1e-6 * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        dW = torch.linalg.solve(A, K.T @ R).T  # d_model x d_mlp
        out, conv1d = _mlp_out(model, layer)
        weight = out.weight
        with torch.no_grad():
            update = (dW.T if conv1d else dW).to(device=weight.device, dtype=weight.dtype)
            weight.add_(update)
        stats["n_keys"].append(int(K.shape[0]))
        stats["n_guard"].append(n_guard)
        stats["n_retain"].append(n_retain)
        stats["fit_residual"].append(float((K @ dW.T - R).norm() / R.norm().clamp_min(1e-30)))
        stats["update_norm"].append(float(dW.norm() / weight.detach().double().norm().clamp_min(1e-30)))
        changed += int((update != 0).sum())
        lowest_edited = min(lowest_edited, layer)
    return KeyedEditStats(
        layers=tuple(int(x) for x in layers),
        target=target,
        n_pairs=len(usable),
        n_skipped=skipped,
        n_keys=tuple(stats["n_keys"]),
        n_guard=tuple(stats["n_guard"]),
        n_retain=tuple(stats["n_retain"]),
        fit_residual=tuple(stats["fit_residual"]),
        update_norm=tuple(stats["update_norm"]),
        changed_parameters=changed,
        seconds=round(time.perf_counter() - start_time, 2),
    )

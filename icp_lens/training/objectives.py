"""Batch losses: one training step's forward passes and loss terms, per objective.

Every objective is a weighted sum of *terms* computed from one stacked forward pass
(rows never interact in a transformer, so stacking equals separate runs; the passes
themselves are :mod:`icp_lens.training.forward`):

===============  ===================================================  =========================
term             value                                                rows of the stacked pass
===============  ===================================================  =========================
``task``         answer cross-entropy on ``x`` (example-weighted;     ``x``
                 group-reweighted for GroupDRO)
``invariance``   ``D(M(x), M(x | do(f = I(f))))`` over the flagged    ``x``, ``x`` with edits
                 features, intervention sampled per step
``consistency``  ``D(M(x), M(x_cf))``, ``x_cf`` the spurious          ``x``, ``x_cf``
                 counterfactual
``contrastive``  InfoNCE between the representation of ``x`` and of   ``x``, ``x_cf`` (else the
                 its perturbed version (other rows = negatives)       edited ``x``)
``cda``          cross-entropy of the answer on ``x_cf``              ``x_cf``
``clp``          squared logit difference between ``x`` and ``x_cf``  ``x``, ``x_cf``
===============  ===================================================  =========================

Objectives (``lam`` = ``TrainConfig.lam``):

- ``erm``: ``task``; ``jtt``: ``task`` with the error set upweighted (weights come with the
  batch); ``groupdro``: ``sum_g q_g task_g`` with ``q`` updated by exponentiated gradient;
- ``invariance``: ``task + lam * invariance`` (no counterfactuals needed with ``mean``,
  ``zero`` or ``resample_batch`` interventions);
- ``consistency``: ``lam * task + (1 - lam) * consistency``;
- ``contrastive``: ``task + lam * contrastive``; ``cda``: mean of ``task`` and ``cda``;
  ``clp``: ``task + lam * clp``.

The pair terms need spurious counterfactuals. The trainer passes a ``pairs`` batch for
them when the training batch has none (from a separate pool, or from the training
examples that have counterfactuals), so every step carries every term.
``TrainConfig.extra_terms`` adds more terms with their own weights (e.g. invariance plus
a little consistency). Interventions for the invariance term: ``resample`` (each
feature takes its value on the spurious counterfactual: needs counterfactuals),
``resample_batch`` (its value on another example of the batch), ``mean`` (its mean over
the training prompts, fitted once at the start) and ``zero``.

A ``resample`` from the spurious counterfactual patches the positions from the first one
where a counterfactual of the batch differs from its prompt: before it the model (causal)
computes the same activations on both, so patching there would change no value, only
stop the gradient through the patched units. (With ``resample_batch``, ``mean`` and
``zero`` every position is patched.)

*The invariance rows branch.* The ``x with edits`` rows are not run from the embeddings.
Either they branch off the clean rows at the first edited layer, and attention whose
output the edits overwrite is not computed for them (:mod:`icp_lens.training.branch`), or,
when the edits start at a later position ``p``, they run positions ``p..`` only on the
clean rows' keys and values of the positions before (``forward.suffix_forward``; the last
position alone where the edits replace every head of every layer whose keys and values
they could change, as with every head of a 2-layer organism); whichever computes less.
The values and gradients are the stacked pass's.
``BatchLoss(..., branch=False)`` runs the stacked reference instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

from icp_lens.devices import input_device
from icp_lens.edits import Edit
from icp_lens.features import Feature
from icp_lens.interventions import Mean, Resample, Zero
from icp_lens.model import HookedModel, model_dims
from icp_lens.training import losses as L
from icp_lens.training.counterfactuals import capture_prefix, shared_prefix
from icp_lens.training.data import TrainBatch
from icp_lens.training.forward import StepForward

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.training.config import TrainConfig
    from icp_lens.training.ddp import StepSync

__all__ = [
    "Objective",
    "OBJECTIVES",
    "Term",
    "TERMS",
    "InterventionName",
    "INTERVENTIONS",
    "term_weights",
    "needs_features",
    "needs_counterfactuals",
    "needs_groups",
    "BatchLoss",
    "capture_prefix",
]

Objective = Literal["erm", "invariance", "consistency", "contrastive", "jtt", "groupdro", "cda", "clp"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
Term = Literal["task", "invariance", "consistency", "contrastive", "cda", "clp"]
TERMS: tuple[str, ...] = get_args(Term)
InterventionName = Literal["resample", "resample_batch", "mean", "zero"]
INTERVENTIONS: tuple[str, ...] = get_args(InterventionName)
_CF_TERMS = ("consistency", "cda", "clp")


def term_weights(objective: str, lam: float, extra: dict[str, float] | None = None) -> dict[str, float]:
    """The weight of each loss term under ``objective`` (see the module docstring)."""
    base = {
        "erm": {"task": 1.0},
        "jtt": {"task": 1.0},
        "groupdro": {"task": 1.0},
        "invariance": {"task": 1.0, "invariance": lam},
        "consistency": {"task": lam, "consistency": 1.0 - lam},
        "contrastive": {"task": 1.0, "contrastive": lam},
        "cda": {"task": 0.5, "cda": 0.5},
        "clp": {"task": 1.0, "clp": lam},
    }
    if objective not in base:
        raise ValueError(f"Unknown objective {objective!r}; valid: {list(OBJECTIVES)}")
    weights = dict(base[objective])
    for name, w in (extra or {}).items():
        if name not in TERMS:
            raise ValueError(f"Unknown loss term {name!r} in extra_terms; valid: {list(TERMS)}")
        weights[name] = weights.get(name, 0.0) + float(w)
    return {k: v for k, v in weights.items() if v != 0.0}


def needs_features(weights: dict[str, float], has_counterfactuals: bool) -> bool:
    """Whether these terms need flagged features (invariance; contrastive without counterfactuals)."""
    return "invariance" in weights or ("contrastive" in weights and not has_counterfactuals)


def needs_counterfactuals(weights: dict[str, float]) -> bool:
    return any(t in weights for t in _CF_TERMS)


def needs_groups(objective: str) -> bool:
    return objective == "groupdro"


class BatchLoss:
    """Computes a batch's loss terms for one objective; holds the state that lives across steps.

    ``features`` are the flagged (regularised) features, ``means`` their ``Mean``
    interventions (for the ``mean`` intervention), ``n_groups`` the number of groups
    (GroupDRO). ``state_dict`` / ``load_state_dict`` carry the GroupDRO weights through
    checkpoints.
    """

    def __init__(
        self,
        model: HookedModel,
        config: TrainConfig,
        *,
        features: Sequence[Feature] = (),
        means: dict[Feature, Mean] | None = None,
        n_groups: int = 0,
        branch: bool = True,
    ) -> None:
        self.model = model
        self.config = config
        self.features = tuple(features)
        self.means = means or {}
        self.weights = term_weights(config.objective, config.lam, config.extra_terms)
        self.n_groups = n_groups
        self.group_q = torch.full((n_groups,), 1.0 / n_groups, device=input_device(model)) if n_groups else None
        # data-parallel training (:mod:`icp_lens.training.ddp`) sets this to the global batch's first
        # position where a counterfactual differs from its prompt, so each rank patches what one process would
        self.shared_start: int | None = None
        # ... and this to where this rank's rows sit in the global batch, for what reads other ranks' rows
        # (GroupDRO's group means, InfoNCE's negatives, pair_fraction's head, resample_batch's sources)
        self.sync: StepSync | None = None
        n_layers = model_dims(model).n_layers
        self.representation = config.representation or (
            f"blocks.{n_layers - 1}.hook_resid_post" if "contrastive" in self.weights else "logits"
        )
        # the answer losses read the last position only: unembed only that one
        self.forward = StepForward(model, branch=branch, last_only=config.task_loss != "lm")

    @property
    def branch(self) -> bool:
        """Whether the invariance rows branch off the clean rows (:mod:`~icp_lens.training.branch`)."""
        return self.forward.branch

    @branch.setter
    def branch(self, value: bool) -> None:
        self.forward.branch = bool(value)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"group_q": None if self.group_q is None else self.group_q.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("group_q") is not None:
            self.group_q = torch.tensor(state["group_q"], dtype=torch.float32, device=input_device(self.model))

    # -- pieces -----------------------------------------------------------------------
    def _choose_edits(self, batch: TrainBatch, gen: torch.Generator, rows: tuple[int, int]) -> list[Edit]:
        cfg = self.config
        options = [i for i in cfg.interventions if i != "resample" or batch.spurious is not None]
        if not options or not self.features:
            return []
        # the draws come from the step's CPU generator (the same choices on every device)
        name = options[int(torch.randint(len(options), (1,), generator=gen, device="cpu"))]
        feats = list(self.features)
        k = cfg.features_per_step
        if k is not None and k < len(feats):
            feats = [feats[i] for i in sorted(torch.randperm(len(feats), generator=gen, device="cpu")[:k].tolist())]
        if name == "zero":
            interventions: dict[Feature, Any] = {f: Zero() for f in feats}
        elif name == "mean":
            missing = [f for f in feats if f not in self.means]
            if missing:
                raise RuntimeError(f"No fitted means for {missing[:3]}; the trainer fits them before training")
            interventions = {f: self.means[f] for f in feats}
        else:
            if name == "resample":
                source = batch.spurious
            else:  # another example of the batch: a random cyclic shift, so no row keeps its own
                n = batch.size if self.sync is None else self.sync.anchor_rows  # (the global batch's, of a rank)
                shift = 1 + int(torch.randint(max(1, n - 1), (1,), generator=gen, device="cpu"))
                if self.sync is None:
                    source = batch.tokens.roll(shift % n, dims=0)
                else:
                    source = self.sync.shifted_tokens(shift).to(batch.tokens.device)
            align = "exact" if source.shape[1] == batch.tokens.shape[1] else "right"
            activations = capture_prefix(self.model, feats, source)
            interventions = {f: Resample(f.select(activations[f.hook_name]), align) for f in feats}
            if name == "resample" and align == "exact":
                start = shared_prefix(batch.tokens, source) if self.shared_start is None else self.shared_start
                if start == batch.tokens.shape[1]:  # the counterfactuals equal the prompts: nothing to intervene on
                    return []
                if start > 0:  # before it the counterfactual's activations are the prompt's own
                    positions = tuple(range(start, batch.tokens.shape[1]))
                    return [Edit(f, interventions[f], positions=positions, rows=rows) for f in feats]
        return [Edit(f, interventions[f], rows=rows) for f in feats]

    def _represent(self, last: Tensor, captured: Tensor | None, batch: TrainBatch) -> Tensor:
        if self.representation == "logits":
            return last
        if self.representation == "candidates":
            return L.candidate_logits(last, batch.candidates).clamp_min(-1e4)
        assert captured is not None
        return captured[:, -1].flatten(1)

    def _task(self, last: Tensor, batch: TrainBatch, logits: Tensor | None = None) -> Tensor:
        cfg = self.config
        if cfg.task_loss == "lm":
            assert logits is not None
            per_example = L.lm_loss(logits, batch.tokens, answer=batch.answer, reduction="none")
        else:
            cands = batch.candidates if cfg.task_loss == "candidates" else None
            per_example = L.answer_cross_entropy(last, batch.answer, candidates=cands, reduction="none")
        return per_example

    def _synced_groupdro(self, per_example: Tensor, group_id: Tensor, sync: StepSync) -> Tensor:
        """This rank's part of GroupDRO's loss, the group weights updated from the global group means.

        The global batch's group sums are this rank's sums plus the other ranks' (an
        ``all_reduce``), divided by the global batch's counts; ``q`` is then updated as in one
        process, identically on every rank, and this rank's part of ``sum_g q_g loss_g`` is
        ``sum_g q_g (its sum of group g) / count_g``: the parts sum to the one-process loss.
        """
        from icp_lens.distributed import all_reduce_sum

        assert self.group_q is not None
        # a stand-in row (a rank without rows) belongs to no group: it adds nothing
        local, _ = L.group_sums(per_example, group_id if not sync.task_idle else -torch.ones_like(group_id),
                                self.n_groups)  # fmt: skip
        counts = sync.group_counts.to(local.device, local.dtype).clamp_min(1.0)
        g_loss = all_reduce_sum(local.detach()) / counts
        present = sync.group_counts.to(local.device) > 0
        self.group_q = L.group_dro_update(self.group_q.to(g_loss.device), g_loss, present, eta=self.config.groupdro_eta)
        return (self.group_q * local / counts).sum()

    # -- the step ---------------------------------------------------------------------
    def __call__(self, batch: TrainBatch, gen: torch.Generator, pairs: TrainBatch | None = None) -> dict[str, Tensor]:
        """Loss terms of ``batch`` (detached) and ``loss``, their weighted sum (with gradients).

        ``pairs`` (examples with spurious counterfactuals, e.g. from a small pool) carries
        the pair terms (invariance, consistency, contrastive, cda, clp) when given; the
        task term stays on ``batch``. Without it the pair terms use ``batch`` itself.
        """
        w = self.weights
        cfg = self.config
        anchor = pairs if pairs is not None else batch
        if cfg.pair_fraction < 1.0:  # pair terms on part of the batch: a cheaper step
            # (one rank of many: its rows of the global batch's head, a head of its own rows)
            size = self.sync.local_head if self.sync is not None else max(1, round(cfg.pair_fraction * anchor.size))
            anchor = anchor.head(size)
            if pairs is not None:
                pairs = anchor
        has_cf = anchor.spurious is not None
        blocks: list[tuple[str, Tensor]] = [("x", batch.tokens)]
        pair_terms = any(t in w for t in (*_CF_TERMS, "contrastive", "invariance"))
        if pairs is not None and pair_terms:
            blocks.append(("a", pairs.tokens))
        if has_cf and (any(t in w for t in _CF_TERMS) or "contrastive" in w):
            blocks.append(("cf", anchor.spurious))
        edits: list[Edit] = []
        do = None  # the intervened copy of the anchor rows: (block it copies, rows, tokens)
        if ("invariance" in w or ("contrastive" in w and not has_cf)) and self.features:
            edits = self._choose_edits(anchor, gen, (0, anchor.size))
            if edits:
                source = "a" if any(name == "a" for name, _ in blocks) else "x"  # x: its first rows
                do = (source, anchor.size, anchor.tokens)
        rep_hook = None if self.representation in ("logits", "candidates") else self.representation
        out = self.forward(blocks, edits, do, rep_hook)

        logits_x, last_x, cap_x = out["x"]
        per_example = self._task(last_x, batch, logits_x)
        terms: dict[str, Tensor] = {}
        synced_groups = self.sync is not None and self.sync.group_counts is not None  # one rank of many
        if cfg.objective == "groupdro" and self.group_q is not None and synced_groups:
            terms["task"] = self._synced_groupdro(per_example, batch.group_id, self.sync)
        elif cfg.objective == "groupdro" and self.group_q is not None:
            g_loss, present = L.group_losses(per_example, batch.group_id, self.n_groups)
            self.group_q = L.group_dro_update(self.group_q.to(g_loss.device), g_loss, present, eta=cfg.groupdro_eta)
            terms["task"] = (self.group_q * g_loss).sum()
        else:
            terms["task"] = L.weighted_mean(per_example, batch.weight)
        n = anchor.size  # without a pair batch the anchor is the first n rows of x
        logits_a, last_a, cap_a = (t[:n] if t is not None else None for t in out.get("a", out["x"]))
        rep_a = self._represent(last_a, cap_a, anchor)
        if "do" in out and "invariance" in w:
            rep_do = self._represent(out["do"][1], out["do"][2], anchor)
            terms["invariance"] = L.invariance_loss(rep_a, rep_do, cfg.divergence, temperature=cfg.temperature)
        if "cf" in out:
            logits_cf, last_cf, cap_cf = out["cf"]
            rep_cf = self._represent(last_cf, cap_cf, anchor)
            if "consistency" in w:
                terms["consistency"] = L.divergence(
                    rep_a, rep_cf, cfg.divergence, temperature=cfg.temperature, reduction="mean"
                )
            if "cda" in w:
                terms["cda"] = L.weighted_mean(self._task(last_cf, anchor, logits_cf), anchor.weight)
            if "clp" in w:
                terms["clp"] = L.logit_pairing(
                    L.candidate_logits(last_a, anchor.candidates), L.candidate_logits(last_cf, anchor.candidates)
                )
        if "contrastive" in w and ("cf" in out or "do" in out):
            other = out["cf"] if "cf" in out else out["do"]
            z_other = self._represent(other[1], other[2], anchor)
            if self.sync is not None and self.sync.gathers:  # negatives from every rank's rows
                terms["contrastive"] = self.sync.info_nce(rep_a, z_other, temperature=cfg.nce_temperature)
            else:
                terms["contrastive"] = L.info_nce(rep_a, z_other, temperature=cfg.nce_temperature)
        if cfg.objective == "cda" and "cda" in w and "cda" not in terms:  # no counterfactuals here: plain task loss
            w = {**w, "task": 1.0}
        total = sum((w[name] * value for name, value in terms.items() if name in w), 0.0)
        result = {name: value.detach() for name, value in terms.items()}
        result["loss"] = total
        return result

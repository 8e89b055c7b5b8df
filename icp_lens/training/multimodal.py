"""Fine-tuning a vision-language model against a cross-modal shortcut (CIMRL and baselines).

``train_multimodal(model, processor, data, config)`` fine-tunes a LLaVA-style HF model
(``model(input_ids=..., pixel_values=...)``) in place to answer a fixed prompt about an
image with one of a few label words, under one of :data:`MM_OBJECTIVES`:

===============  ==========================================================  ===============
objective        loss                                                        needs
===============  ==========================================================  ===============
``erm``          ``CE(y | x)``                                               labels
``groupdro``     ``sum_g q_g CE_g``, ``q`` by exponentiated gradient          group labels
``jtt``          CE with the initial model's training errors upweighted     labels
``contrastive``  ``CE + omega_1 InfoNCE(z_s(x), z_s(x~))``, ``x~`` the        spurious
                 targeted perturbation (the spurious counterfactual image)   counterfactuals
``disentangle``  ``CE + omega_2 L_dis`` (per-modality and shared heads,      labels
                 orthogonality; :func:`~icp_lens.training.cimrl.disentanglement_loss`)
``intervention`` ``CE + omega_3 KL(p(x) || p(x + delta))``, ``delta`` on the  labels
                 input features picked by gradient attribution
``cimrl``        ``CE + omega_1 L_inv + omega_2 L_dis + omega_3 L_int``       spurious
                                                                             counterfactuals
``invariance``   ``CE + lam KL(p(x) || p(x | do(u = u(x~))))`` for the       scored units,
                 scored ``units`` (ICP's objective: resampling them from     spurious
                 the spurious counterfactual must not move the answer)       counterfactuals
===============  ==========================================================  ===============

The ``x + delta`` copies are made for a share of each batch (``intervention_rows``, default
half: chosen on validation data for cost, see :class:`MultimodalTrainConfig`). None of the
CIMRL objectives reads group labels. Representations are read from the
language model's last layer (``output_hidden_states``): ``z_s`` at the answer position
(where image and text meet), ``z_v`` averaged over the image-token positions, ``z_t``
over the other text positions; the three heads of the disentanglement term are linear
maps trained with the model and discarded afterwards. ``omega`` weights of 0 drop a
term, so each CIMRL term can be trained alone or left out (the ablations). The default
``omega = (1, 0.3, 1)`` was chosen among ``omega_2`` in 1, 0.3, 0.1, 0 on validation data
without group labels (the share of probe images answered right both as they are and with
the background swapped, on three organisms); with ``omega_2 = 1`` one organism of three
failed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from icp_lens.training import losses as L
from icp_lens.training.attention import ATTENTION_CHOICES, attention_kernel, resolve_attention
from icp_lens.training.cimrl import (
    attribution_counterfactual,
    attribution_mask,
    disentanglement_loss,
    intervention_loss,
)
from icp_lens.training.multimodal_data import (  # re-exported: they were defined here
    MultimodalData,
    counterfactual_accuracy,
    data_from_probes,
    predict_classes,
)

__all__ = [
    "MMObjective",
    "MM_OBJECTIVES",
    "MultimodalData",
    "MultimodalTrainConfig",
    "MultimodalTrainResult",
    "train_multimodal",
    "data_from_probes",
    "predict_classes",
    "counterfactual_accuracy",
]

MMObjective = Literal["erm", "groupdro", "jtt", "contrastive", "disentangle", "intervention", "cimrl", "invariance"]
MM_OBJECTIVES: tuple[str, ...] = get_args(MMObjective)


@dataclass(frozen=True)
class MultimodalTrainConfig:
    """Settings of :func:`train_multimodal`; the defaults need no group labels."""

    objective: MMObjective = "cimrl"
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    #: contrastive, disentanglement, intervention; omega_2 = 0.3 was chosen on validation data
    #: (label-free counterfactual accuracy on the organisms' probe split, benchmarks/multimodal_table.py --select)
    omega: tuple[float, float, float] = (1.0, 0.3, 1.0)
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    orthogonality: float = 0.1
    temperature: float = 0.1
    attribution_fraction: float = 0.25
    attribution_every: int = 10
    #: share of each batch's rows that get an ``x + delta`` copy for the intervention term (the
    #: first ``ceil(share * batch)`` rows; the batch is a random draw, so any share is a random one).
    #: 0.5 was chosen among 1, 0.5, 0.25 on validation data without group labels: the cheapest share
    #: within 0.01 of the best counterfactual accuracy (benchmarks/multimodal_table.py --select-cost;
    #: 0.25 failed on one organism of three)
    intervention_rows: float = 0.5
    #: share of the batch's rows that have a background swap whose swap ``x~`` enters the step (the first
    #: ``ceil(share * n)`` of them; the contrastive pairs and the invariance term's patched rows). 1 keeps
    #: every swap; a smaller share makes the step cheaper, with fewer positive pairs and negatives for InfoNCE
    view_rows: float = 1.0
    #: the contrastive term's counterfactual views ``x~`` as a fixed target (stop-gradient, as the key
    #: encoder of MoCo or the target branch of BYOL/SimSiam): one forward pass without a backward
    #: through them. Not with ``invariance``, whose patched rows read the views' activations inside the
    #: same pass. Off by default: on the organisms it lost the invariance (validation counterfactual
    #: accuracy 0.04 against 0.91), the views must be pulled too.
    stop_gradient: bool = False
    jtt_upweight: float = 5.0
    groupdro_eta: float = 0.01
    seed: int = 0
    #: objective ``invariance``: the units (bridge hook name of an MLP's neurons or of ``attn.hook_z``,
    #: unit indices), e.g. the top of ``icp_lens.scoring.image_scores.score_image_units``, and the
    #: weight of the term
    units: tuple[tuple[str, tuple[int, ...]], ...] = ()
    lam: float = 1.0
    #: the attention kernel for the run (:mod:`icp_lens.training.attention`): ``auto`` (eager on the CPU for
    #: prompts under 128 positions, where it is faster, else the model's own), ``model``, ``eager`` or ``sdpa``;
    #: the model's own kernel is put back afterwards
    attention: str = "auto"
    #: with validation data (``train_multimodal(..., val=)``, rows with image counterfactuals): steps between
    #: evaluations of its label-free counterfactual accuracy; the best checkpoint is kept (see train_multimodal)
    eval_every: int = 25
    #: stop after this many evaluations without a better score (``None``: run every step, keep the best)
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.objective not in MM_OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {MM_OBJECTIVES}")
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError(f"steps >= 1, batch_size >= 2 and lr > 0 needed: {self}")
        for name in ("intervention_rows", "view_rows"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.attribution_every < 1:
            raise ValueError(f"attribution_every must be >= 1, got {self.attribution_every}")
        if len(self.omega) != 3 or min(self.omega) < 0:
            raise ValueError(f"omega must be three weights >= 0, got {self.omega}")
        if self.objective == "invariance" and not any(idx for _, idx in self.units):
            raise ValueError("objective 'invariance' needs units: (hook name, unit indices) pairs, e.g. the top of "
                             "a score table")  # fmt: skip
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.eval_every < 1 or (self.patience is not None and self.patience < 1):
            raise ValueError(f"eval_every and patience must be >= 1, got {self.eval_every} and {self.patience}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {self.attention!r}; valid: {ATTENTION_CHOICES}")

    def weights(self) -> dict[str, float]:
        """The weight of each auxiliary term under this objective (``omega`` for ``cimrl``)."""
        w1, w2, w3 = self.omega
        return {
            "contrastive": w1 if self.objective in ("contrastive", "cimrl") else 0.0,
            "disentangle": w2 if self.objective in ("disentangle", "cimrl") else 0.0,
            "intervention": w3 if self.objective in ("intervention", "cimrl") else 0.0,
            "invariance": self.lam if self.objective == "invariance" else 0.0,
        }


@dataclass(frozen=True)
class MultimodalTrainResult:
    """What a run did: steps run, seconds, the mean of each loss term over the last 20 steps, the
    attention kernel it trained with (``None``: the model's own, not named by its config), and with
    validation data each evaluation's ``(step, counterfactual accuracy)`` (the best one's weights kept)."""

    objective: str
    steps: int
    seconds: float
    final_terms: dict[str, float]
    attention: str | None = None
    val_scores: tuple[tuple[int, float], ...] = ()

    @property
    def best_step(self) -> int | None:
        """The step whose weights the model holds (``None``: no validation, the last)."""
        return self.val_scores[_best_index(list(self.val_scores)) - 1][0] if self.val_scores else None


def _forward(model: Any, ids: Tensor, pixels: Tensor, label_ids: list[int]) -> tuple[Tensor, Tensor]:
    out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    return out.logits[:, -1, label_ids].float(), out.hidden_states[-1]


@torch.no_grad()
def _errors(model: Any, data: MultimodalData, label_ids: list[int], batch: int = 500) -> Tensor:
    wrong = []
    for start in range(0, data.labels.shape[0], batch):
        pixels = data.pixel_values[start : start + batch]
        ids = data.input_ids.expand(pixels.shape[0], -1)
        logits, _ = _forward(model, ids, pixels, label_ids)
        wrong.append(logits.argmax(-1) != data.labels[start : start + batch])
    return torch.cat(wrong)


def _attribution(
    model: Any, input_ids: Tensor, pixels: Tensor, labels: Tensor, label_ids: list[int], fraction: float
) -> Tensor:
    """The attribution mask of one batch: input gradients of each example's loss, right vs wrong."""
    pixels = pixels.detach().clone().requires_grad_(True)
    logits, _ = _forward(model, input_ids.expand(pixels.shape[0], -1), pixels, label_ids)
    per_example = F.cross_entropy(logits, labels, reduction="none")
    (grads,) = torch.autograd.grad(per_example.sum(), pixels)
    correct = (logits.detach().argmax(-1) == labels).cpu()
    return attribution_mask(grads.detach().cpu(), correct, fraction=fraction).to(pixels.device)


def _resample(units: list[int], b: int, n_cf: int) -> Any:
    """A forward pre-hook on an output projection: rows ``b + n_cf ...`` (the patched copies of the rows
    with a counterfactual) take the input columns ``units`` (``pruning.multimodal.unit_columns``: a
    neuron's one, a head's ``d_head``) from rows ``b ...`` (their counterfactuals), detached."""

    def hook(module: Any, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        hidden = args[0].clone()
        source = hidden[b : b + n_cf][..., units].detach()
        hidden[b + n_cf : b + 2 * n_cf, ..., units] = source
        return (hidden, *args[1:])

    return hook


def train_multimodal(
    model: Any,
    data: MultimodalData,
    config: MultimodalTrainConfig,
    *,
    progress: str | None = None,
    val: MultimodalData | None = None,
) -> MultimodalTrainResult:
    """Fine-tune ``model`` in place under ``config.objective``; the model is left in eval mode.

    Runs ``config.steps`` AdamW steps on batches drawn (seeded) from ``data``. Rows
    without a spurious counterfactual image take no part in the contrastive term. The
    attention kernel is ``config.attention``'s for the run and the model's own afterwards.

    ``val`` (validation rows with spurious counterfactual images, e.g. an organism's probe
    split): every ``config.eval_every`` steps the model's :func:`counterfactual_accuracy` on
    it is measured (right on the image *and* on its counterfactual; no group labels), the
    weights of the best evaluation are kept and loaded at the end, and with
    ``config.patience`` the run stops after that many evaluations without a better score.
    CIMRL needs this: on the organisms its validation score peaks within 25-50 steps and
    then can fall apart (seed 0 at 300 steps: 0.92 at step 175, 0.04 at step 225), and
    whether it has by step 150 turns on float rounding (one seed of five failed under one
    attention kernel and not under the other).
    """
    if val is not None and (val.has_counterfactual is None or not bool(val.has_counterfactual.any())):
        raise ValueError("val needs rows with a spurious counterfactual image (image_counterfactual) to select on")
    device = next(model.parameters()).device
    kernel = resolve_attention(config.attention, device_type=device.type, positions=int(data.input_ids.shape[-1]))
    with attention_kernel(model, kernel) as used:
        result = _train(model, data, config, progress, val)
    return replace(result, attention=used)


def _train(
    model: Any, data: MultimodalData, config: MultimodalTrainConfig, progress: str | None,
    val: MultimodalData | None = None,
) -> MultimodalTrainResult:  # fmt: skip
    from tqdm.auto import tqdm

    from icp_lens.hooks import module_hooks
    from icp_lens.pruning.multimodal import llava_out_proj, unit_columns

    weights = config.weights()
    paired = weights["contrastive"] > 0 or weights["invariance"] > 0  # rows with their background swap
    if paired and (data.counterfactual is None or data.has_counterfactual is None):
        raise ValueError(f"objective {config.objective!r} needs spurious counterfactual images (image_counterfactual)")
    modules = [(llava_out_proj(model, hook), unit_columns(model, hook, idx)) for hook, idx in config.units if idx]
    if config.objective == "groupdro" and (data.groups is None or bool((data.groups < 0).all())):
        raise ValueError("objective 'groupdro' needs group labels; the CIMRL objectives do not")
    device = next(model.parameters()).device
    label_ids = list(data.label_ids)
    n_cls = len(label_ids)
    gen = torch.Generator().manual_seed(config.seed)
    d = model.config.text_config.hidden_size
    with torch.random.fork_rng(devices=[]):  # the heads' initialisation is seeded too
        torch.manual_seed(config.seed)
        # built on the CPU (the seeded CPU generator: the same heads on every device), then moved
        heads = torch.nn.ModuleList([torch.nn.Linear(d, n_cls, device="cpu") for _ in range(3)]).to(device)
    params = list(model.parameters()) + (list(heads.parameters()) if weights["disentangle"] > 0 else [])
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    n = data.labels.shape[0]
    sample_weight = None
    if config.objective == "jtt":
        model.eval()
        sample_weight = L.jtt_weights(_errors(model, data, label_ids), config.jtt_upweight)
    n_groups = int(data.groups.max().item()) + 1 if data.groups is not None else 0
    q = torch.full((max(n_groups, 1),), 1.0 / max(n_groups, 1), device=device)
    image_token = model.config.image_token_index
    is_image = (data.input_ids == image_token).to(device)
    text_pos = (~is_image).nonzero().flatten()[:-1]  # text positions but the answer position
    start, history = time.perf_counter(), []
    val_scores: list[tuple[int, float]] = []
    best: tuple[float, dict[str, Tensor]] | None = None
    mask: Tensor | None = None
    model.train()
    bar = tqdm(total=config.steps, desc=progress, disable=progress is None, unit="step", leave=False)
    with torch.enable_grad(), bar:
        for step in range(config.steps):
            bar.update(1)
            idx = torch.randint(0, n, (config.batch_size,), generator=gen, device="cpu")
            pixels = data.pixel_values[idx].to(device)
            labels = data.labels[idx].to(device)
            b = idx.shape[0]
            if weights["intervention"] > 0 and (mask is None or step % config.attribution_every == 0):
                fraction = config.attribution_fraction
                mask = _attribution(model, data.input_ids.to(device), pixels, labels, label_ids, fraction)
            # one stacked pass: x, the spurious counterfactuals x~, x again with the units patched from x~
            # (invariance), then x + delta (intervention)
            stack = [pixels]
            rows = torch.zeros(b, dtype=torch.bool, device="cpu")
            if paired:
                rows = data.has_counterfactual[idx]
                if config.view_rows < 1.0:  # the first ceil(share * n) rows that have a swap
                    rows &= rows.cumsum(0) <= math.ceil(config.view_rows * int(rows.sum()))
                if int(rows.sum()) >= 2:
                    stack.append(data.counterfactual[idx][rows].to(device))
                else:
                    rows = torch.zeros(b, dtype=torch.bool, device="cpu")
            n_cf = int(rows.sum())
            n_patched = n_cf if weights["invariance"] > 0 else 0
            target_z: Tensor | None = None  # the views' z_s under stop-gradient
            if n_cf and config.stop_gradient and not n_patched:
                with torch.no_grad():
                    views = stack.pop()
                    _, view_hidden = _forward(model, data.input_ids.to(device).expand(n_cf, -1), views, label_ids)
                    target_z = view_hidden[:, -1]
            n_views = n_cf if target_z is None else 0  # view rows inside the stacked pass
            if n_patched:
                stack.append(pixels[rows.to(device)])
            n_int = 0
            if weights["intervention"] > 0:
                n_int = max(1, math.ceil(config.intervention_rows * b))
                stack.append(attribution_counterfactual(pixels, mask, generator=gen)[:n_int])
            every = torch.cat(stack)
            stacked_ids = data.input_ids.to(device).expand(every.shape[0], -1)
            pre = [(m, _resample(units, b, n_cf)) for m, units in modules] if n_patched else []
            with module_hooks(pre=pre):
                all_logits, all_hidden = _forward(model, stacked_ids, every, label_ids)
            logits, hidden = all_logits[:b], all_hidden[:b]
            per_example = F.cross_entropy(logits, labels, reduction="none")
            terms: dict[str, Tensor] = {}
            if config.objective == "groupdro":
                group_loss, present = L.group_losses(per_example, data.groups[idx].to(device), n_groups)
                q = L.group_dro_update(q, group_loss, present, eta=config.groupdro_eta)
                terms["task"] = (q * group_loss).sum()
            else:
                w = None if sample_weight is None else sample_weight[idx].to(device)
                terms["task"] = L.weighted_mean(per_example, w)
            z_s = hidden[:, -1]
            if n_cf and weights["contrastive"] > 0:
                cf_z = all_hidden[b : b + n_cf, -1] if target_z is None else target_z
                terms["contrastive"] = L.info_nce(z_s[rows.to(device)], cf_z, temperature=config.temperature)
            if weights["disentangle"] > 0:
                z_v = hidden[:, is_image].mean(1)
                z_t = hidden[:, text_pos].mean(1)
                dis = disentanglement_loss(
                    heads[0](z_v), heads[1](z_t), heads[2](z_s), z_v, z_t, z_s, labels,
                    alpha=config.alpha, beta=config.beta, gamma=config.gamma, lam=config.orthogonality,
                )  # fmt: skip
                terms["disentangle"] = dis["total"]
            if n_patched:
                patched = all_logits[b + n_cf : b + 2 * n_cf]
                terms["invariance"] = L.invariance_loss(logits[rows.to(device)], patched)
            if weights["intervention"] > 0:
                terms["intervention"] = intervention_loss(logits[:n_int], all_logits[b + n_views + n_patched :])
            loss = terms["task"] + sum(weights[k] * v for k, v in terms.items() if k != "task")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({k: float(v.detach()) for k, v in terms.items()})
            if val is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
                model.eval()
                score = counterfactual_accuracy(model, val)
                model.train()
                val_scores.append((step + 1, score))
                if best is None or score > best[0]:
                    best = (score, {k: v.detach().clone() for k, v in model.state_dict().items()})
                elif config.patience is not None and len(val_scores) - _best_index(val_scores) >= config.patience:
                    break
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    tail = history[-20:]
    final = {k: sum(h.get(k, 0.0) for h in tail) / len(tail) for k in tail[-1]}
    return MultimodalTrainResult(config.objective, len(history), time.perf_counter() - start, final,
                                 val_scores=tuple(val_scores))  # fmt: skip


def _best_index(scores: list[tuple[int, float]]) -> int:
    """1-based position of the first best score."""
    values = [s for _, s in scores]
    return values.index(max(values)) + 1

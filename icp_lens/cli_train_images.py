"""``icp-lens train`` on image probes: a vision-language model against a cross-modal shortcut.

When ``--train`` holds image probes (rows with ``image``, e.g. the splits of ``icp-lens
organism --variant waterbirds``), ``icp-lens train`` loads ``--model`` with
``AutoModelForImageTextToText`` and ``AutoProcessor`` and runs
:func:`icp_lens.training.multimodal.train_multimodal`:

    icp-lens train --model runs/wb/model --train runs/wb/train.jsonl --objective cimrl --out runs/wb-cimrl

``--objective`` is one of :data:`IMAGE_OBJECTIVES` (``cimrl``, the default choice for
images, needs no group labels: its contrastive term reads the ``image_counterfactual``
of the rows that have one). ``--omega W1,W2,W3`` weights CIMRL's contrastive,
disentanglement and intervention terms (default 1,0.3,1); ``--intervention-rows F``
the share of each batch that gets an ``x + delta`` copy, ``--view-rows F`` the share of
the rows with a background swap whose swap enters the step, and ``--stop-gradient`` the
contrastive views as a fixed target, ``--attention auto|model|eager|sdpa`` the attention kernel
while training (see :class:`MultimodalTrainConfig`). ``--objective invariance
--scores TABLE [--top-k K] [--lambda L]`` is ICP's objective on the ``K`` (default 16)
highest rows of an image score table (``icp-lens score`` on image probes).
``--max-steps``, ``--batch-size``, ``--lr``, ``--seed`` and ``--device`` apply; ``--val
FILE`` (image probes) adds worst-group accuracy before and after, and with ``--early-stopping
counterfactual_accuracy`` (``--eval-every N``, default 25; ``--patience P``) selects the
checkpoint on it: the weights with the best share of ``--val`` rows answered right on the
image and on its ``image_counterfactual`` (no group labels; give a validation split, not the
test set). CIMRL on the organisms needs this: without it, whether the invariance still holds
at the last step turns on float rounding. The checkpoint (model +
processor) is written all at once, then reloaded with ``transformers`` alone and its
logits compared with the trained model's (``verification``). Options of the text
trainer that have no meaning here (LoRA, retain text, stage 2, ...) are refused by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["IMAGE_OBJECTIVES", "has_images", "run_image_training"]

IMAGE_OBJECTIVES = ("cimrl", "contrastive", "disentangle", "intervention", "erm", "jtt", "groupdro", "invariance")
#: what ``--objective invariance`` regularises on image probes when ``--top-k`` is not given
DEFAULT_IMAGE_TOP_K = 16
#: options of the text trainer that ``--objective invariance`` uses on image probes too
_INVARIANCE_OPTIONS = ("scores", "top_k", "lam")
#: text-trainer options this path refuses when set (name -> value that means "unset")
_TEXT_ONLY = {
    "scores": None, "top_k": None, "prune_top_k": 0, "lora": None, "lora_r": None, "pairs": None, "retain": None,
    "retain_weight": None, "stage2_steps": None, "rescore_every": None, "task_loss": None, "representation": None,
    "epochs": None, "lam": None, "resume": False, "dropout": None, "save_dtype": None,
    "weight_decay": 0.0, "grad_clip": 1.0, "warmup_ratio": 0.1, "checkpoint_dir": None,
    "checkpoint_every": None, "keep_checkpoints": False, "divergence": "kl", "intervention": ["resample"],
}  # fmt: skip


def has_images(path: Path) -> bool:
    """Whether the first row of a probe file carries an ``image`` (without reading the rest)."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    return "image" in json.loads(line)
    except (OSError, ValueError):
        return False  # the text path reports the problem with its usual message
    return False


def _flags(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(args: argparse.Namespace) -> None:
    from icp_lens.distributed import launched_by_torchrun
    from icp_lens.pruning.export import check_target

    if launched_by_torchrun():
        raise ValueError("the multimodal trainer runs as one process: start it without torchrun")
    if args.objective not in IMAGE_OBJECTIVES:
        valid = list(IMAGE_OBJECTIVES)
        raise ValueError(f"--objective {args.objective} does not apply to image probes; valid: {valid}")
    allowed = _INVARIANCE_OPTIONS if args.objective == "invariance" else ()
    given = [_flags(k) for k, unset in _TEXT_ONLY.items() if k not in allowed and getattr(args, k, unset) != unset]
    if given:
        raise ValueError(f"{', '.join(given)} do(es) not apply to image probes (the multimodal trainer)")
    if args.objective == "invariance" and args.scores is None:
        raise ValueError("--objective invariance needs --scores TABLE (from `icp-lens score` on image probes)")
    stop = getattr(args, "early_stopping", None)
    if stop is not None and stop != "counterfactual_accuracy":
        raise ValueError(f"--early-stopping {stop} does not apply to image probes; valid: ['counterfactual_accuracy']")
    if stop is not None and args.val is None:
        raise ValueError("--early-stopping needs --val FILE (image probes with image_counterfactual)")
    if getattr(args, "eval_every", None) is not None and stop is None:
        raise ValueError("--eval-every on image probes needs --early-stopping counterfactual_accuracy")
    check_target(args.out, overwrite=args.overwrite, source=args.model)


def _units(args: argparse.Namespace) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``--objective invariance``: the ``--top-k`` units of the ``--scores`` table, grouped by hook point."""
    from icp_lens.pruning.select import select_features
    from icp_lens.scoring.image_scores import IMAGE_KINDS
    from icp_lens.scoring.table import ScoreTable

    if args.objective != "invariance":
        return ()
    table = ScoreTable.load(args.scores)
    top_k = args.top_k if args.top_k is not None else DEFAULT_IMAGE_TOP_K
    units: dict[str, list[int]] = {}
    for f in select_features(table, top_k=top_k, kinds=IMAGE_KINDS):
        units.setdefault(f.hook_name, []).append(f.index)
    if not units:
        raise ValueError(f"--scores {args.scores} has no rows of kinds {list(IMAGE_KINDS)} to regularise")
    return tuple((hook, tuple(idx)) for hook, idx in units.items())


def _worst_group(model: Any, data: Any) -> dict[str, float]:
    from icp_lens.training.multimodal import predict_classes

    chosen = predict_classes(model, data)
    ok = chosen == data.labels
    out = {"accuracy": ok.float().mean().item()}
    if data.groups is not None:
        out["worst_group_accuracy"] = min(ok[data.groups == g].float().mean().item() for g in data.groups.unique())
    if data.counterfactual is not None:
        rows = data.has_counterfactual
        flips = predict_classes(model, data, counterfactual=True)[rows] != chosen[rows]
        out["flip_rate"] = flips.float().mean().item()
    return out


def run_image_training(args: argparse.Namespace) -> int:
    """The ``train`` command's image path; returns the exit status."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from icp_lens.atomic import atomic_directory
    from icp_lens.devices import resolve_device
    from icp_lens.training.multimodal import MultimodalTrainConfig, data_from_probes, train_multimodal

    try:
        _check(args)
        omega = tuple(float(w) for w in (args.omega or "1,0.3,1").split(","))
        config = MultimodalTrainConfig(
            objective=args.objective, steps=args.max_steps or 150, batch_size=args.batch_size or 64,
            lr=args.lr or 1e-3, omega=omega, seed=args.seed, units=_units(args),
            lam=args.lam if args.lam is not None else 1.0, stop_gradient=args.stop_gradient,
            **({} if args.intervention_rows is None else {"intervention_rows": args.intervention_rows}),
            **({} if args.view_rows is None else {"view_rows": args.view_rows}),
            **({} if getattr(args, "attention", None) is None else {"attention": args.attention}),
            **({} if getattr(args, "eval_every", None) is None else {"eval_every": args.eval_every}),
            patience=args.patience if getattr(args, "early_stopping", None) else None,
        )  # fmt: skip
        device = resolve_device(args.device)
        model = AutoModelForImageTextToText.from_pretrained(str(args.model)).eval().to(device)
        processor = AutoProcessor.from_pretrained(str(args.model))
        data = data_from_probes(args.train, processor)
        val = data_from_probes(args.val, processor) if args.val is not None else None
        select = val if getattr(args, "early_stopping", None) else None
        if select is not None and select.has_counterfactual is None:
            raise ValueError(f"--early-stopping counterfactual_accuracy: --val {args.val} has no image_counterfactual")
    except (ValueError, OSError) as err:  # OSError covers check_target's FileExistsError
        print(f"icp-lens train: error: {err}", file=sys.stderr)
        return 2
    before = _worst_group(model, val if val is not None else data)
    result = train_multimodal(
        model, data, config, progress=None if args.quiet or args.json else config.objective, val=select
    )
    after = _worst_group(model, val if val is not None else data)
    model.to("cpu")  # written and verified on the CPU, in float32
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    reloaded = AutoModelForImageTextToText.from_pretrained(str(args.out)).eval()
    pixels = data.pixel_values[:64]
    ids = data.input_ids.expand(pixels.shape[0], -1)
    with torch.no_grad():
        diff = (reloaded(input_ids=ids, pixel_values=pixels).logits - model(input_ids=ids, pixel_values=pixels).logits)
    error = float(diff.abs().max())
    passed = error <= 1e-4
    payload = {
        "out": str(args.out), "objective": config.objective, "omega": list(config.omega),
        "intervention_rows": config.intervention_rows, "view_rows": config.view_rows,
        "stop_gradient": config.stop_gradient, "attention": result.attention, "steps": result.steps,
        "best_step": result.best_step, "val_scores": [list(v) for v in result.val_scores],
        "seconds": round(result.seconds, 2), "final_terms": result.final_terms,
        "evaluated_on": "val" if val is not None else "train", "before": before, "after": after,
        "verification": {"max_abs_logit_diff": error, "passed": passed},
    }  # fmt: skip
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(
            f"{config.objective} (images): {result.steps} steps in {result.seconds:.1f} s "
            f"(attention: {result.attention or 'the model default'})"
        )
        where = "val" if val is not None else "train"
        for name in after:
            print(f"{where} {name:22s} {before[name]:.3f} -> {after[name]:.3f}")
        print(f"written {args.out}; reloaded with transformers: max |logit diff| {error:.1e} "
              f"({'PASS' if passed else 'FAIL'})")  # fmt: skip
    return 0 if passed else 1

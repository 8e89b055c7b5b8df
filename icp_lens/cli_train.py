"""``icp-lens train``: invariance fine-tuning (and the baselines) from the command line.

``icp-lens train --model DIR --train FILE.jsonl --out DIR2 [--scores scores.csv --top-k K]
[--objective invariance|consistency|contrastive|erm|jtt|groupdro|cda|clp] [--lambda L] [--lora]
[--epochs N] [--val FILE.jsonl]``
    Fine-tune a copy of the checkpoint ``DIR`` on ``FILE.jsonl`` (probe format) and write
    ``DIR2``: an HF checkpoint (LoRA merged) verified against the trained model, with
    ``training.json`` (settings, features, result) and ``history.csv`` (loss terms and
    validation metrics). ``--scores`` + ``--top-k`` choose the features to regularise
    (the invariance objective needs them); ``--prune-top-k P`` makes it the hybrid: the
    top ``P`` features are pruned (``plan.json`` is written too) and the next ``K``
    regularised. ``--pairs FILE.jsonl`` draws the counterfactual pairs from a separate
    (small) pool, so the training file needs no counterfactuals. An interrupted run
    continues with ``--resume`` (checkpoints in ``--checkpoint-dir``, default
    ``DIR2.checkpoints``, removed after a successful export unless ``--keep-checkpoints``).
    ``--pair-batch-size N`` draws N pairs per step from the pair pool across token shapes
    (default: ``--batch-size`` pairs of one shape). ``--retain FILE --retain-weight W``
    adds the retain term, ``W * KL(original || trained)`` of the next-token distributions
    on ordinary text (``FILE``: ``.txt``, one text per line, or ``.jsonl`` with ``"text"``),
    which keeps the language modelling while the other terms train. ``--rescore-every N``
    re-scores the features every N steps (attribution on the pairs, pruned ones ablated)
    and adds the ``--rescore-top-k`` highest to the regularised set, so a shortcut that
    moves to other features during training is followed.

*The pair recipe.* ``--objective consistency`` with ``--pairs`` (e.g. from ``icp-lens pairs``)
fills every option left unset from :data:`icp_lens.training.PAIR_RECIPE`: LoRA, task and
pair terms over the answer candidates, task weight 0.15, lr 5e-4, 16 examples per step,
30 steps, the retain term at weight 1 (with ``--retain``), and a second stage of at most
30 steps on the pairs alone, stopped on their own flip rate (``--stage2-steps``; see
:mod:`icp_lens.training.staged`). The command prints which values it chose; any option
given on the command line wins.

*Many processes.* ``torchrun --nproc-per-node N --no-python icp-lens train ...`` trains
data-parallel (gloo on the CPU, NCCL on CUDA GPUs; :mod:`icp_lens.training.ddp`): every
batch is split by rows across the N processes and the gradients summed, so the run
reproduces one process's (same data order, same loss curve to float32 round-off) for
the objectives that average over examples; a warning says when it cannot. Rank 0
prints, writes the checkpoints and exports; the others exit 0 after training.

Exit status 0 on success, 1 when the export's verification fails (the checkpoint is
still written), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from icp_lens.devices import add_device_arguments

__all__ = ["add_train_parser"]

STOP_METRICS = ("worst_group_accuracy", "accuracy", "counterfactual_accuracy", "loss", "flip_rate")
_OBJECTIVES = ["invariance", "consistency", "contrastive", "erm", "jtt", "groupdro", "cda", "clp",
               "cimrl", "disentangle", "intervention"]  # the last three: image probes (cli_train_images)
_IMAGE_ONLY = ("cimrl", "disentangle", "intervention")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``train`` on a subparsers object (``handler`` returns the exit status)."""
    p = sub.add_parser("train", help="fine-tune a model to be invariant to spurious features (or a baseline)")
    p.add_argument("--model", type=Path, required=True, help="HF checkpoint directory")
    p.add_argument("--train", type=Path, required=True, help="training examples (probe-format JSONL)")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument(
        "--save-dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="write the trained weights in this dtype after verifying them in float32 (default: float32)",
    )  # fmt: skip
    p.add_argument("--scores", type=Path, default=None, help="score table from `icp-lens score` (.csv/.parquet)")
    p.add_argument("--top-k", type=int, default=None, help="regularise the K highest-scoring features")
    p.add_argument("--prune-top-k", type=int, default=0, help="hybrid: prune the top P features, regularise the next K")
    p.add_argument("--prune-mode", choices=["zero", "mean"], default="mean", help="hybrid pruning mode (mean)")
    p.add_argument("--objective", choices=_OBJECTIVES, default=None,
                   help="training objective (default: invariance; cimrl when --train holds image probes)")
    p.add_argument("--omega", default=None,
                   help="image probes: weights of CIMRL's contrastive, disentanglement and intervention terms "
                        "(W1,W2,W3; default 1,0.3,1)")  # fmt: skip
    p.add_argument("--intervention-rows", type=float, default=None,
                   help="image probes: share of each batch given an x + delta copy by CIMRL's intervention term "
                        "(default: MultimodalTrainConfig's)")  # fmt: skip
    p.add_argument("--view-rows", type=float, default=None,
                   help="image probes: share of the rows with a background swap whose swap enters each step "
                        "(default: MultimodalTrainConfig's)")  # fmt: skip
    p.add_argument("--stop-gradient", action="store_true",
                   help="image probes: CIMRL's contrastive views as a fixed target (no backward through them)",
                   )  # fmt: skip
    p.add_argument("--attention", choices=["auto", "model", "eager", "sdpa"], default=None,
                   help="image probes: the attention kernel while training (default auto: eager on the CPU for "
                        "prompts under 128 positions, where it is faster; else the model's own)")  # fmt: skip
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="regulariser weight (invariance: task + L*inv, default 1; consistency: "
                        "L*task + (1-L)*d, default 0.5; the pair recipe: 0.15)")  # fmt: skip
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="train LoRA adapters (peft) and merge them on export (default off; on in the pair recipe)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (8)")
    p.add_argument("--epochs", type=int, default=None, help="passes over --train (1; the pair recipe: --max-steps)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (the pair recipe: 30)")
    p.add_argument("--task-loss", choices=["answer", "candidates", "lm"], default=None,
                   help="task term: answer (cross-entropy over the vocabulary, default), candidates (over the answer "
                        "and its alternatives: the pair recipe), lm")  # fmt: skip
    p.add_argument("--representation", default=None,
                   help="what pair terms compare: logits, candidates (answer + alternatives: the pair recipe), ...")
    p.add_argument("--stage2-steps", type=int, default=None,
                   help="a second stage of at most N steps on the pairs alone, early-stopped on their flip rate "
                        "(0: one stage, the default; the pair recipe: 30)")  # fmt: skip
    p.add_argument("--stage2-check-every", type=int, default=None,
                   help="stage 2 checks the pairs' flip rate every N steps (5)")  # fmt: skip
    p.add_argument("--stage2-patience", type=int, default=None, help="stage 2 stops N checks after the last drop (2)")
    p.add_argument("--val", type=Path, default=None, help="validation examples (JSONL), evaluated every epoch")
    p.add_argument("--pairs", type=Path, default=None, help="pool of examples with spurious counterfactuals")
    p.add_argument(
        "--pair-batch-size",
        type=int,
        default=None,
        help="pairs per step drawn across token shapes from --pairs (default: --batch-size, one shape)",
    )
    p.add_argument(
        "--retain",
        type=Path,
        action="append",
        default=None,
        help="ordinary text for the retain term (.txt one text per line, or .jsonl with 'text'); repeat to pool files",
    )
    p.add_argument(
        "--retain-weight",
        type=float,
        default=None,
        help="weight of the retain term KL(original || trained) on --retain text (1 when --retain is given)",
    )
    p.add_argument("--retain-batch-size", type=int, default=None, help="retain texts per step (8; the pair recipe: 4)")
    p.add_argument("--retain-tokens", type=int, default=None,
                   help="each retain text cut to its first N tokens (64; the pair recipe: 32)")  # fmt: skip
    p.add_argument("--rescore-every", type=int, default=None,
                   help="every N steps: re-score (attribution on the pairs), regularise the new top ones")  # fmt: skip
    p.add_argument("--rescore-top-k", type=int, default=None, help="features added per re-scoring (default: --top-k)")
    p.add_argument("--rescore-kinds", type=_csv, default=["neuron", "head"],
                   help="feature kinds re-scoring considers, comma-separated (neuron,head)")  # fmt: skip
    p.add_argument("--intervention", type=_csv, default=["resample"],
                   help="resample|resample_batch|mean|zero, comma-separated to sample among (resample)")  # fmt: skip
    p.add_argument("--divergence", choices=["kl", "reverse_kl", "js", "cosine", "mse"], default="kl")
    p.add_argument("--lr", type=float, default=None, help="learning rate (1e-3; the pair recipe: 5e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (64; the pair recipe: 16)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=None, help="set every dropout probability (default: the model's)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--early-stopping", choices=list(STOP_METRICS), default=None,
                   help="validation metric to stop on and select the best checkpoint by (needs --val)")  # fmt: skip
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: every epoch)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="resumable checkpoints (default DIR2.checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: per eval)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints after the export")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    # training keeps float32 master weights: no --dtype (mixed precision is not built yet)
    add_device_arguments(p, dtype=False)
    p.set_defaults(handler=_cmd_train)
    return p


def _features(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    from icp_lens.pruning import hybrid_split, select_features

    if args.scores is None:
        if args.top_k is not None or args.prune_top_k:
            raise ValueError("--top-k and --prune-top-k need --scores")
        return [], []
    if args.top_k is None and not args.prune_top_k:
        raise ValueError("--scores needs --top-k K (features to regularise) and/or --prune-top-k P")
    if args.prune_top_k:
        split = hybrid_split(args.scores, prune_top_k=args.prune_top_k, regularise_top_k=args.top_k or 0)
        return list(split.regularise), list(split.prune)
    return select_features(args.scores, top_k=args.top_k), []


#: what an unset option means outside the pair recipe (the historical defaults)
PLAIN_DEFAULTS: dict[str, Any] = {
    "lam": None, "lr": 1e-3, "batch_size": 64, "max_steps": None, "epochs": 1, "lora": False, "lora_r": 8,
    "task_loss": "answer", "representation": None, "retain_weight": 0.0, "retain_batch_size": 8,
    "retain_tokens": 64, "stage2_steps": 0, "stage2_check_every": 5, "stage2_patience": 2,
}  # fmt: skip


def uses_pair_recipe(args: argparse.Namespace) -> bool:
    """``--objective consistency`` with a ``--pairs`` pool: unset options take ``PAIR_RECIPE``'s values."""
    return args.objective == "consistency" and args.pairs is not None


def resolve_defaults(args: argparse.Namespace) -> list[str]:
    """Fill every unset option (None) from the pair recipe or the plain defaults; returns the recipe's choices."""
    from icp_lens.training import PAIR_RECIPE

    recipe = uses_pair_recipe(args)
    chosen = []
    for name, plain in PLAIN_DEFAULTS.items():
        if getattr(args, name) is not None:
            continue
        value = PAIR_RECIPE.get(name, plain) if recipe else plain
        if name == "retain_weight":
            value = (PAIR_RECIPE["retain_weight"] if recipe else 1.0) if args.retain else 0.0
        if name == "epochs" and recipe:
            value = max(1, args.max_steps or 1)  # the step count, not the (small) task file, ends the run
        setattr(args, name, value)
        if recipe and value != plain:
            chosen.append(f"{name} {value}")
    return chosen


def _config(args: argparse.Namespace) -> Any:
    from icp_lens.training import TrainConfig

    return TrainConfig(
        objective=args.objective, lam=args.lam, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None, dropout=args.dropout,
        interventions=tuple(args.intervention), divergence=args.divergence, prune_mode=args.prune_mode,
        lora=args.lora, lora_r=args.lora_r, eval_every=args.eval_every, early_stopping=args.early_stopping,
        patience=args.patience, checkpoint_every=args.checkpoint_every, seed=args.seed, progress=not args.quiet,
        pair_batch_size=args.pair_batch_size, retain_weight=args.retain_weight,
        retain_batch_size=args.retain_batch_size, retain_tokens=args.retain_tokens,
        rescore_every=args.rescore_every, rescore_top_k=args.rescore_top_k, rescore_kinds=tuple(args.rescore_kinds),
        task_loss=args.task_loss, representation=args.representation, stage2_steps=args.stage2_steps,
        stage2_check_every=args.stage2_check_every, stage2_patience=args.stage2_patience,
    )  # fmt: skip


def _retain_texts(paths: list[Path] | None) -> list[str] | None:
    """The texts of every ``--retain`` file, pooled in order."""
    if not paths:
        return None
    from icp_lens.training.data import read_texts

    return [text for path in paths for text in read_texts(path)]


def _print_counterfactual_check(args: argparse.Namespace, limit: int = 128) -> None:
    """Without --val: how often training answers flip under their spurious counterfactuals, before/after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.counterfactuals import sensitivity
    from icp_lens.probes import read_probes

    source = args.pairs if args.pairs is not None else args.train
    examples = [ex for ex in read_probes(source) if ex.spurious_counterfactual][:limit]
    if not examples:
        print("no --val and no spurious counterfactuals in --train: nothing to evaluate the result on")
        return
    tok = AutoTokenizer.from_pretrained(str(args.out))
    rows = {}
    for name, path in (("before", args.model), ("after", args.out)):
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        frame = sensitivity(model, tok, examples)
        rows[name] = frame.set_index("counterfactual").loc["spurious"]
    b, a = rows["before"], rows["after"]
    what = "pairs" if args.pairs is not None else "train"
    print(
        f"{what} spurious flip rate {b['flip_rate']:.3f} -> {a['flip_rate']:.3f}, KL {b['kl']:.4f} -> {a['kl']:.4f} "
        f"({len(examples)} training prompts; pass --val for held-out numbers)"
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from icp_lens.cli_train_images import has_images, run_image_training

    images = has_images(args.train)
    if args.objective is None:
        args.objective = "cimrl" if images else "invariance"
    if images:
        return run_image_training(args)
    image_options = {"--omega": args.omega is not None, "--intervention-rows": args.intervention_rows is not None,
                     "--view-rows": args.view_rows is not None, "--stop-gradient": args.stop_gradient,
                     "--attention": args.attention is not None}  # fmt: skip
    if args.objective in _IMAGE_ONLY or any(image_options.values()):
        what = f"--objective {args.objective}" if args.objective in _IMAGE_ONLY else next(
            name for name, given in image_options.items() if given)  # fmt: skip
        print(f"icp-lens train: error: {what} needs image probes (rows with 'image'); {args.train} has none",
              file=sys.stderr)  # fmt: skip
        return 2
    return _cmd_train_text(args)


def _cmd_train_text(args: argparse.Namespace) -> int:
    from icp_lens.devices import resolve_device
    from icp_lens.distributed import is_main
    from icp_lens.progress import heartbeat
    from icp_lens.pruning.export import check_target
    from icp_lens.training import Trainer, fit_staged

    try:
        check_target(args.out, overwrite=args.overwrite, source=args.model)
        features, prune = _features(args)
        recipe = resolve_defaults(args)
        config = _config(args)
        if (args.retain is None) != (config.retain_weight == 0):
            raise ValueError("--retain FILE and --retain-weight W (> 0) go together")
        retain = _retain_texts(args.retain)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"icp-lens train: error: {err}", file=sys.stderr)
        return 2
    checkpoints = args.checkpoint_dir or args.out.with_name(args.out.name + ".checkpoints")
    device = resolve_device(args.device)  # under torchrun, main() has joined the group and set cuda:LOCAL_RANK
    main = is_main()  # under torchrun rank 0 prints and exports; the others train and wait for it
    try:
        with heartbeat("loading the model and the data", disable=args.quiet or not main):
            trainer = Trainer(args.model, args.train, config, features=features, prune=prune, val=args.val,
                              pairs=args.pairs, retain=retain, checkpoint_dir=checkpoints,
                              device=str(device))  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        print(f"icp-lens train: error: {err}", file=sys.stderr)
        return 2
    if not main:
        trainer, _ = fit_staged(trainer, resume=args.resume)
        trainer.export(args.out)  # rank 0 writes it; this waits for it
        return 0
    if recipe and not args.json:
        print("the pair recipe (--objective consistency with --pairs) for the options left unset: " + ", ".join(recipe))
    trainer, result = fit_staged(trainer, resume=args.resume)
    history = result.history  # the --val rows: stage 2 (if any) evaluates the pairs it stops on instead
    if "stage" in history:
        history = history[history["stage"] == 1]
    val_rows = history[history["kind"] == "val"] if args.val is not None and len(history) else None
    before = None
    if val_rows is not None and len(val_rows):
        first = val_rows.iloc[0]
        before = {k: (None if first[k] != first[k] else float(first[k])) for k in result.final}
    with heartbeat("writing and verifying the checkpoint", disable=args.quiet or args.json):
        report = trainer.export(args.out, overwrite=args.overwrite, result=result, save_dtype=args.save_dtype)
    if not args.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    payload = {
        "out": str(args.out),
        "objective": config.objective,
        "lora": config.lora,
        "features": [str(f) for f in features],
        "pruned": [str(f) for f in prune],
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 2),
        "val_before": before,
        "val_after": result.final or None,
        "verification": report.to_dict(),
    }
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"{config.objective}{' (LoRA)' if config.lora else ''}: {result.steps} steps in {result.seconds:.1f} s"
              + (" (stopped early)" if result.stopped_early else ""))  # fmt: skip
        if features or prune:
            print(f"regularised {len(features)} feature(s), pruned {len(prune)}")
        if before is not None:
            for name in ("accuracy", "worst_group_accuracy", "flip_rate"):
                if before.get(name) is not None:
                    print(f"val {name:22s} {before[name]:.3f} -> {result.final[name]:.3f}")
        if before is None:
            with heartbeat("measuring the counterfactual flip rate before and after", disable=args.quiet):
                _print_counterfactual_check(args)
        print(f"written {args.out} (history.csv, training.json{', plan.json' if prune else ''})")
        print(report)
        if args.save_dtype in ("bfloat16", "float16"):
            print(f"weights written in {args.save_dtype} after the float32 verification above (--save-dtype)")
    return 0 if report.passed else 1

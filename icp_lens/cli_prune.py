"""``icp-lens prune`` and ``icp-lens apply-plan``: the pruner from the command line.

``icp-lens prune --model DIR --scores scores.csv --out DIR2 (--top-k K | --threshold T)
[--mode zero|mean] [--probe FILE.jsonl] [--overwrite]``
    Select features from a score table, write ``DIR2`` (an HF checkpoint with its
    tokenizer and ``plan.json``) and verify it against the hook-ablated original.
    ``--probe`` gives the reference prompts for mean mode (required there) and the
    verification inputs (random token ids otherwise).
``icp-lens apply-plan --model DIR --plan plan.json --out DIR2``
    Apply an existing plan (refused if it was made for another model).

Both exit with status 1 when verification fails (the checkpoint is still written).
``--device auto|cpu|cuda|cuda:N|mps`` says where the forward passes (mean mode's reference,
the verification) run; the weights are edited on the CPU in float64 either way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from icp_lens.devices import add_device_arguments

__all__ = ["add_prune_parsers"]


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification against hook ablation")
    parser.add_argument(
        "--tolerance", type=float, default=1e-5,
        help="max |logit diff| to pass (default 1e-5), plus the measured fp32 floors (each line prints its allowance)",
    )  # fmt: skip
    parser.add_argument(
        "--save-dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="write the weights in this dtype after verifying them in float32 (default: the model's float32)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    # the edit is folded on the CPU in float64 and verified in float32 (--save-dtype sets what is written):
    # --device moves the forward passes (mean reference, verification) only, so there is no --dtype
    add_device_arguments(parser, dtype=False)


def add_prune_parsers(sub: Any) -> None:
    prune = sub.add_parser("prune", help="prune features into a new HF checkpoint and verify it")
    prune.add_argument("--model", type=Path, required=True, help="HF checkpoint directory")
    prune.add_argument("--scores", type=Path, required=True, help="score table from `icp-lens score` (.csv/.parquet)")
    prune.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    pick = prune.add_argument_group("selection (at least one)")
    pick.add_argument("--top-k", type=int, default=None, help="prune the K highest-scoring prunable features")
    pick.add_argument("--threshold", type=float, default=None, help="prune features with score > T")
    pick.add_argument(
        "--min-share", type=float, default=None, help="prune rows with score >= F x the top score (the ICP rule)"
    )
    prune.add_argument(
        "--kinds", type=_kinds, default=None,
        help="which rows compete (default: every prunable kind in the table): neuron,head,value,direction,token; "
        "vision_neuron,vision_head,projector_neuron,neuron,head,image_direction for a vision-language model",
    )  # fmt: skip
    prune.add_argument("--min-selectivity", type=float, default=None, help="only rows with selectivity >= F")
    prune.add_argument("--token-mode", choices=["zero", "mean"], default="zero", help="token rows: zero or mean row")
    prune.add_argument(
        "--direction-mode", choices=["mean", "project"], default="mean",
        help="direction rows: replace the component by its mean (default) or project it out",
    )  # fmt: skip
    prune.add_argument("--per-layer-cap", type=int, default=None, help="at most N features from any one layer")
    prune.add_argument("--mode", choices=["zero", "mean"], default="zero", help="zero or mean ablation (zero)")
    prune.add_argument("--probe", type=Path, default=None, help="probe JSONL: mean reference and verification prompts")
    prune.add_argument(
        "--force", action="store_true",
        help="prune even if the table records another model than --model (its .meta.json); a warning says so",
    )  # fmt: skip
    _add_common(prune)
    prune.set_defaults(handler=_cmd_prune)

    apply = sub.add_parser("apply-plan", help="apply a plan.json to a checkpoint and verify it")
    apply.add_argument("--model", type=Path, required=True, help="HF checkpoint directory the plan was made for")
    apply.add_argument("--plan", type=Path, required=True, help="plan.json (or a directory holding one)")
    apply.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    apply.add_argument("--probe", type=Path, default=None, help="probe JSONL for the verification prompts")
    _add_common(apply)
    apply.set_defaults(handler=_cmd_apply_plan)


def _prompts(probe: Path | None) -> list[str] | None:
    if probe is None:
        return None
    from icp_lens.pruning.means import reference_texts

    return reference_texts(probe)


def _print(result: Any, as_json: bool) -> int:
    payload = result.to_dict()
    passed = result.verification is None or result.verification.passed
    if as_json:
        print(json.dumps(payload, indent=2))
        return 0 if passed else 1
    print(f"{result.plan.summary()} -> {result.out}")
    print("features: " + (", ".join(str(f) for f in result.plan.features) or "(none)"))
    if result.plan.tokens:
        print("tokens: " + ", ".join(str(t) for t in result.plan.tokens))
    if result.plan.directions is not None:
        print("directions: " + ", ".join(str(f) for f in result.plan.directions.features)
              + f" ({result.plan.direction_mode}; {result.stats.changed} weight entries changed)")  # fmt: skip
    print(f"export took {result.export_seconds:.2f} s; plan written to {result.out / 'plan.json'}")
    if result.verification is not None:
        print(result.verification)
    saved = json.loads((result.out / "config.json").read_text()).get("dtype")
    if saved in ("bfloat16", "float16"):
        print(f"weights written in {saved} after the float32 verification above (--save-dtype)")
    return 0 if passed else 1


def _cmd_prune(args: argparse.Namespace) -> int:
    from icp_lens.cli_images import is_vision_language
    from icp_lens.pruning import prune

    if is_vision_language(args.model):  # both towers of a LLaVA-style model: icp_lens.cli_images
        from icp_lens.cli_images import run_image_prune

        return run_image_prune(args)
    if args.top_k is None and args.threshold is None and args.min_share is None:
        raise ValueError("choose features with --top-k K and/or --threshold T (or --min-share F)")
    if args.token_mode == "mean" and args.probe is None:
        raise ValueError("--token-mode mean needs --probe FILE.jsonl (the prompts the mean embedding is taken over)")
    if args.mode == "mean" and args.probe is None:
        raise ValueError("--mode mean needs --probe FILE.jsonl (the prompts each feature's mean is taken over)")
    result = prune(
        args.model,
        args.scores,
        args.out,
        top_k=args.top_k,
        threshold=args.threshold,
        per_layer_cap=args.per_layer_cap,
        mode=args.mode,
        reference=args.probe,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        tolerance=args.tolerance,
        kinds=args.kinds,
        min_selectivity=args.min_selectivity,
        min_share=args.min_share,
        token_mode=args.token_mode,
        direction_mode=args.direction_mode,
        force=args.force,
        save_dtype=args.save_dtype,
        device=args.device,
    )
    return _print(result, args.json)


def _kinds(text: str) -> list[str]:
    from icp_lens.pruning.select import SELECTABLE_KINDS

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SELECTABLE_KINDS]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(f"unknown kinds {bad or text!r}; valid: {','.join(SELECTABLE_KINDS)}")
    return kinds


def _cmd_apply_plan(args: argparse.Namespace) -> int:
    from icp_lens.pruning import PrunePlan, apply_plan

    plan = PrunePlan.load(args.plan)
    result = apply_plan(
        args.model,
        plan,
        args.out,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        prompts=_prompts(args.probe),
        tolerance=args.tolerance,
        save_dtype=args.save_dtype,
        device=args.device,
    )
    return _print(result, args.json)

"""``icp-lens eval``: the evaluation report of an HF checkpoint on a probe-format file.

``icp-lens eval --model DIR --data FILE.jsonl [--json] [--n-boot N] [--sensitive-key KEY]``

``--json`` prints one JSON object whose keys include ``accuracy, worst_group_accuracy,
group_accuracy, flip_rate, ece, demographic_parity_diff, equal_opportunity_gap``
(``null`` where the data lacks what a metric needs: groups, spurious counterfactuals,
two values of the sensitive attribute); see ``icp_lens.evaluation.report``. The model
is run with ``transformers`` alone, as a user of the checkpoint would run it. A file of
image probes (rows with ``image``) is run through ``AutoModelForImageTextToText`` and the
checkpoint's ``AutoProcessor``; the spurious flip rate then reads ``image_counterfactual``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from icp_lens.devices import add_device_arguments

__all__ = ["add_eval_parser"]


def add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser("eval", help="evaluate an HF checkpoint on a probe-format JSONL file")
    ev.add_argument("--model", type=Path, required=True, help="HF checkpoint directory")
    ev.add_argument("--data", type=Path, required=True, help="probe-format JSONL (prompt, answer, alternatives, ...)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for the intervals (0: none)")
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ev.add_argument("--sensitive-key", default=None, help="group attribute to treat as sensitive (key=value parts)")
    ev.add_argument("--batch-size", type=int, default=256)
    add_device_arguments(ev, device_map=True)
    ev.set_defaults(handler=_cmd_eval)


def _cmd_eval_images(args: argparse.Namespace) -> int:
    """``eval`` on image probes: the vision-language model with ``transformers`` alone."""
    import sys

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from icp_lens.evaluation import evaluate_predictions
    from icp_lens.evaluation.image_predictions import predict_image_examples

    try:
        model = AutoModelForImageTextToText.from_pretrained(str(args.model)).eval()
        processor = AutoProcessor.from_pretrained(str(args.model))
        predictions = predict_image_examples(model, processor, args.data, batch_size=args.batch_size)
    except (ValueError, OSError) as err:
        print(f"icp-lens eval: error: {err}", file=sys.stderr)
        return 2
    report = evaluate_predictions(predictions, n_boot=args.n_boot, seed=args.seed, sensitive_key=args.sensitive_key)
    return _print_report(args, report, f"{len(predictions.examples)} image examples")


def _cmd_eval(args: argparse.Namespace) -> int:
    from icp_lens.cli_train_images import has_images

    if has_images(args.data):
        return _cmd_eval_images(args)
    from icp_lens.distributed import is_main
    from icp_lens.evaluation import evaluate
    from icp_lens.probes import read_probes
    from icp_lens.pruning.source import load_for_command, load_tokenizer

    model = load_for_command(args.model, args)
    tokenizer = load_tokenizer(args.model)
    examples = read_probes(args.data, tokenizer=tokenizer)
    report = evaluate(
        model, tokenizer, examples, n_boot=args.n_boot, seed=args.seed,
        sensitive_key=args.sensitive_key, batch_size=args.batch_size, data_parallel=True,
    )  # fmt: skip
    if not is_main():  # under torchrun: rank 0 prints
        return 0
    return _print_report(args, report, f"{len(examples)} examples")


def _print_report(args: argparse.Namespace, report: Any, what: str) -> int:
    """The report as JSON (``--json``) or as a table with the notes of the metrics left empty."""
    if args.json:
        print(report.to_json())
        return 0
    print(f"{args.model} on {args.data} ({what})")
    print(report.to_frame().to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    for metric, why in sorted(getattr(report, "notes", {}).items()):
        print(f"  {metric}: {why}")
    return 0

"""``icp-lens pairs --spec SPEC.json --model M --out DIR [--holdout F] [--seed N] [--overwrite] [--json]``.

Generates counterfactual pairs from a template spec (see :mod:`icp_lens.counterfactuals`):
``DIR/pairs.jsonl`` (prompts with spurious and causal counterfactuals, the probe format),
``DIR/task.jsonl`` (explicit-cue prompts), ``DIR/heldout_pairs.jsonl`` and
``DIR/heldout_task.jsonl`` with ``--holdout``, and ``DIR/report.json`` / ``report.md``.
The model is read for its tokenizer only: counterfactuals are paired by token length.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_pairs_parser"]


def add_pairs_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pairs`` on the ``icp-lens`` subparsers."""
    parser = sub.add_parser("pairs", help="generate counterfactual pairs from a template spec (JSON)")
    parser.add_argument(
        "--spec", type=Path, required=True, help="the pair spec (JSON; see icp_lens.counterfactuals.spec)"
    )
    parser.add_argument(
        "--model", required=True, help="HF checkpoint directory, hub name or alias (its tokenizer is used)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--holdout", type=float, default=0.0, help="fraction of values and templates kept out for evaluation (0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for partners and the held-out draw (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(handler=_cmd_pairs)
    return parser


def _cmd_pairs(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from icp_lens.counterfactuals import PairSpec, generate_pairs
    from icp_lens.loading import resolve_model_dir

    spec = PairSpec.load(args.spec)  # validate before loading anything
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(args.model)))
    result = generate_pairs(spec, tokenizer, holdout=args.holdout, seed=args.seed)
    out = result.write(args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.report, indent=2))
        return 0
    c = result.report["counts"]
    rejected = len(result.report["rejected"]["train"]) + len(result.report["rejected"]["heldout"])
    print(f"pairs {c['pairs']} ({c['pairs_with_causal']} with a causal counterfactual), task {c['task']}, "
          f"held-out pairs {c['heldout_pairs']}, held-out task {c['heldout_task']}, rejected {rejected}")  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    print(f"written   {out}: {', '.join(names)}")
    return 0

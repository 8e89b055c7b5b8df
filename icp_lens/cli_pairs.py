"""``icp-lens pairs --spec SPEC.json --model M --out DIR [--holdout F] [--seed N] [--overwrite] [--json]``.

Generates counterfactual pairs from a template spec (see :mod:`icp_lens.counterfactuals`):
``DIR/pairs.jsonl`` (prompts with spurious and causal counterfactuals, the probe format),
``DIR/task.jsonl`` (explicit-cue prompts), ``DIR/heldout_pairs.jsonl`` and
``DIR/heldout_task.jsonl`` with ``--holdout``, ``DIR/anchors.txt`` (training templates
filled with the neutral values, for ``icp-lens train --retain``) when the spec has
neutral values, and ``DIR/report.json`` / ``report.md``. The model is read for its
tokenizer only: counterfactuals are paired by token length. Next step, the pair recipe::

    icp-lens train --model M --train DIR/task.jsonl --pairs DIR/pairs.jsonl --objective consistency \
        --retain TEXTS.txt --retain DIR/anchors.txt --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icp_lens.devices import add_device_arguments

__all__ = ["add_pairs_parser", "add_audit_parser"]


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
    anchors = f" --retain {out / 'anchors.txt'}" if result.anchors else ""
    print(f"next      icp-lens train --model {args.model} --train {out / 'task.jsonl'} --pairs {out / 'pairs.jsonl'} "
          f"--objective consistency --retain YOUR_TEXTS.txt{anchors} --out OUT")  # fmt: skip
    return 0


def add_audit_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``audit`` on the ``icp-lens`` subparsers."""
    parser = sub.add_parser(
        "audit",
        help="how much a model uses an attribute (sensitivity, flip rate) and how spurious it is (MI ratio)",
        description=(
            "Sensitivity of MODEL to the spurious and causal counterfactuals of a pair spec (or a probe file): "
            "mean KL of the answer candidates and flip rate, and the causal robustness ratio. With --data, the "
            "spuriousness ratio rho = (I(X_S;Y) - I(X_S;Y|X_C)) / I(X_S;Y) on a labelled CSV."
        ),
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory, hub name or alias")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", type=Path, help="a pair spec (JSON): its pairs are generated and measured")
    source.add_argument("--probe", type=Path, help="a probe file (JSONL) with counterfactuals")
    parser.add_argument("--data", type=Path, default=None, help="labelled CSV for the spuriousness ratio")
    parser.add_argument(
        "--columns", default="spurious,causal,label", help="the CSV's spurious, causal and label columns"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV here")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_arguments(parser)
    parser.set_defaults(handler=_cmd_audit)
    return parser


def _cmd_audit(args: argparse.Namespace) -> int:
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.counterfactuals import PairSpec, generate_pairs, sensitivity, spuriousness_ratio
    from icp_lens.devices import resolve_device, resolve_dtype
    from icp_lens.loading import resolve_model_dir
    from icp_lens.probes import read_probes

    columns = [c.strip() for c in args.columns.split(",")]
    if len(columns) != 3:
        raise ValueError(f"--columns takes three names (spurious,causal,label), got {args.columns!r}")
    frame = None
    if args.data is not None:
        if not args.data.is_file():
            raise FileNotFoundError(f"No data file at {args.data}")
        frame = pd.read_csv(args.data)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{args.data} lacks columns {missing}; it has {list(frame.columns)}")
    spec = PairSpec.load(args.spec) if args.spec is not None else None
    path = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    probes = list(generate_pairs(spec, tokenizer).pairs) if spec is not None else read_probes(args.probe)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(args.dtype)).eval()
    model = model.to(resolve_device(args.device))
    table = sensitivity(model, tokenizer, probes)
    ratio = None
    if frame is not None:
        ratio = spuriousness_ratio(frame[columns[0]].tolist(), frame[columns[2]].tolist(), frame[columns[1]].tolist())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    if args.json:
        print(json.dumps({"sensitivity": table.to_dict(orient="records"),
                          "spuriousness_ratio": None if ratio is None else ratio.to_dict()}, indent=2))  # fmt: skip
        return 0
    print(table.to_string(index=False))
    if ratio is not None:
        print(f"spuriousness ratio rho {ratio.rho:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}] "
              f"(I(X_S;Y) {ratio.mi:.4f} nats, I(X_S;Y|X_C) {ratio.conditional_mi:.4f}, n {ratio.n})")  # fmt: skip
    if args.out is not None:
        print(f"written   {args.out}")
    return 0

"""The ``icp-lens`` command.

Subcommands:

``icp-lens organism --out DIR [--seed N] [--arch gpt2|llama|neox] [--variant lexical|tag]``
    Train (or reuse) a planted-shortcut organism, write ``DIR/model/`` (an HF checkpoint)
    and its JSONL splits, and print the acceptance report.
``icp-lens demo [--out DIR] [--json]``
    The main job on the built-in default: for now, build the default organism
    (lexical shortcut, GPT-2 architecture, seed 0) and print its report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _add_organism_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--arch", choices=["gpt2", "llama", "neox"], default="gpt2", help="architecture (gpt2)")
    parser.add_argument(
        "--variant",
        choices=["lexical", "tag"],
        default="lexical",
        help="lexical: planted token next to the answer; tag: a name at the start (lexical)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if DIR already holds this organism")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icp-lens",
        description="Find and remove the features through which a spurious attribute drives a transformer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    organism = sub.add_parser("organism", help="train a model with a planted shortcut and report on it")
    organism.add_argument("--out", type=Path, required=True, help="output directory")
    _add_organism_args(organism)
    organism.add_argument("--strict", action="store_true", help="exit with status 1 if an acceptance check fails")
    organism.set_defaults(handler=_cmd_organism)

    demo = sub.add_parser("demo", help="the main job on the built-in default organism")
    demo.add_argument("--out", type=Path, default=None, help="output directory (default: the icp_lens cache)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    demo.set_defaults(handler=_cmd_demo, seed=0, arch="gpt2", variant="lexical", force=False, strict=False)
    return parser


def _report(organism: Any, seconds: float, *, as_json: bool) -> dict[str, Any]:
    report = organism.report
    payload = {
        "organism": str(organism.path),
        "model_dir": str(organism.model_dir),
        "spec": dataclasses.asdict(organism.spec),
        "report": report.to_dict(),
        "passed": report.passed,
        "seconds": round(seconds, 2),
    }
    if as_json:
        print(json.dumps(payload, indent=2))
        return payload
    spec = organism.spec
    print(f"organism  {spec.variant} shortcut, {spec.arch} architecture, seed {spec.seed}")
    print(f"written   {organism.path}  (HF checkpoint in {organism.model_dir})")
    print()
    print(report.to_frame().to_string(index=False))
    print()
    verdict = "all acceptance checks passed" if payload["passed"] else "SOME ACCEPTANCE CHECKS FAILED"
    print(f"{verdict}; model trained in {report.train_seconds:.1f} s, this command took {seconds:.1f} s")
    return payload


def _build(args: argparse.Namespace, out: Path | None) -> tuple[Any, float]:
    from icp_lens.organisms import build_organism

    start = time.perf_counter()
    organism = build_organism(out, variant=args.variant, arch=args.arch, seed=args.seed, force=args.force)
    return organism, time.perf_counter() - start


def _cmd_organism(args: argparse.Namespace) -> int:
    organism, seconds = _build(args, args.out)
    payload = _report(organism, seconds, as_json=args.json)
    return 1 if args.strict and not payload["passed"] else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    organism, seconds = _build(args, args.out)
    _report(organism, seconds, as_json=args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icp-lens`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"icp-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

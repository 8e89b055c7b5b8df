"""``icp-lens organism`` and ``icp-lens demo``: the built-in models with a planted shortcut.

``icp-lens organism --out DIR [--seed N] [--arch gpt2|llama|neox] [--variant lexical|tag|imdb-smollm2|waterbirds]``
    Train (or reuse) an organism (``icp_lens.organisms``), write ``DIR/model/`` and its
    probe-format splits, and print the acceptance report (``--json``: one object;
    ``--strict``: exit 1 when a check fails). ``--device`` (default ``cpu``) is where it
    trains; see :data:`ORGANISM_DEVICE_HELP`.
``icp-lens demo [--out DIR] [--json] [--device cpu|auto|cuda|cuda:N|mps]``
    Score, prune, export, verify and evaluate the default organism (``icp_lens.demo``);
    ``--device`` (default ``cpu``) is where that runs, see :data:`DEMO_DEVICE_HELP`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from icp_lens.devices import DEVICE_HELP, add_device_arguments

__all__ = ["add_organism_parser", "add_demo_parser", "ORGANISM_DEVICE_HELP", "DEMO_DEVICE_HELP"]

#: ``organism --device``: why the default is the CPU and what another device changes
ORGANISM_DEVICE_HELP = (
    f"where the organism trains: {DEVICE_HELP}. Default cpu, not auto: the CPU build is the reference "
    "(the numbers in the README and the tests; the tiny models train in seconds there). A build on another "
    "device is not bit-identical, so its device is recorded in report.json and it is cached apart "
    "(<name>-cuda); a DIR holding another device's build is not reused without --force. waterbirds trains "
    "on the CPU only (cpu or auto)"
)
#: ``demo --device``: the organism is the CPU reference; scoring, pruning and evaluation move
DEMO_DEVICE_HELP = (
    f"where the scoring, the pruning's means and verification, and the evaluation run: {DEVICE_HELP}. "
    "Default cpu, not auto: the demo's models are tiny (a GPU gains nothing) and its documented numbers are "
    "CPU numbers. The default organism is built (or reused) on the CPU whatever this says"
)


def add_organism_parser(sub: Any) -> None:
    organism = sub.add_parser("organism", help="train a model with a planted shortcut and report on it")
    organism.add_argument("--out", type=Path, required=True, help="output directory")
    _add_organism_args(organism)
    _add_precision_arg(organism)
    organism.add_argument("--strict", action="store_true", help="exit with status 1 if an acceptance check fails")
    add_device_arguments(organism, dtype=False, default="cpu", device_help=ORGANISM_DEVICE_HELP)
    organism.set_defaults(handler=_cmd_organism)


def add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="score, prune, export, verify and evaluate the default organism")
    demo.add_argument("--out", type=Path, default=None, help="output directory (default: <icp_lens cache>/demo)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    add_device_arguments(demo, dtype=False, default="cpu", device_help=DEMO_DEVICE_HELP)
    demo.set_defaults(handler=_cmd_demo)


def _add_organism_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--arch", choices=["gpt2", "llama", "neox"], default="gpt2", help="architecture (gpt2)")
    parser.add_argument(
        "--variant",
        choices=["lexical", "tag", "imdb-smollm2", "waterbirds"],
        default="lexical",
        help=(
            "lexical: planted token next to the answer; tag: a name at the start (lexical); "
            "imdb-smollm2: SmolLM2-135M LoRA-fine-tuned on real IMDB reviews with a planted reviewer "
            "name (a real model; minutes, --arch does not apply); waterbirds: a tiny LLaVA vision-language "
            "model on synthetic images where the background, not the bird, decides (about 90 s; "
            "--arch does not apply)"
        ),
    )
    parser.add_argument("--force", action="store_true", help="retrain even if DIR already holds this organism")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _add_precision_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mixed-precision", choices=["auto", "bf16", "no"], default="auto",
        help="imdb-smollm2 only: bf16 (bfloat16 autocast, the reference build), no (float32) or auto (bf16 where "
             "bfloat16 is fast: a GPU, an AVX-512/AMX CPU; float32 on an AVX2-only CPU, where bf16 runs emulated, "
             "about 30x slower; the two builds are cached apart). Default auto",
    )  # fmt: skip


def _report(organism: Any, seconds: float, *, as_json: bool) -> dict[str, Any]:
    report = organism.report
    payload = {
        "organism": str(organism.path),
        "model_dir": str(organism.model_dir),
        "spec": dataclasses.asdict(organism.spec),
        "device": getattr(organism, "device", "cpu"),  # the waterbirds organism trains on the CPU only
        "report": report.to_dict(),
        "passed": report.passed,
        "seconds": round(seconds, 2),
    }
    if as_json:
        print(json.dumps(payload, indent=2))
        return payload
    spec = organism.spec
    arch = getattr(spec, "arch", "llava")
    print(f"organism  {spec.variant} shortcut, {arch} architecture, seed {spec.seed}, trained on {payload['device']}")
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
    if args.variant == "waterbirds":
        from icp_lens.organisms.multimodal import build_waterbirds

        _check_waterbirds_device(args.device)
        organism = build_waterbirds(out, seed=args.seed, force=args.force, progress=not args.json)
        return organism, time.perf_counter() - start
    organism = build_organism(out, variant=args.variant, arch=args.arch, seed=args.seed, force=args.force,
                              progress=not args.json, device=args.device)  # fmt: skip
    return organism, time.perf_counter() - start


def _check_waterbirds_device(device: str) -> None:
    """``build_waterbirds`` trains on the CPU only: refuse any other ``--device`` (``auto`` means the CPU)."""
    if str(device).strip().lower() not in ("cpu", "auto"):
        raise ValueError(f"--device {device}: the waterbirds organism trains on the CPU only (about 90 s there); "
                         "use --device cpu (or auto)")  # fmt: skip


def _cmd_planted(args: argparse.Namespace) -> int:
    from icp_lens.organisms.planted import PlantedFinetune, PlantedSpec, build_planted

    start = time.perf_counter()
    log = (lambda _m: None) if args.json else (lambda m: print(m, flush=True))
    spec = PlantedSpec(
        name=args.variant, seed=args.seed, finetune=PlantedFinetune(mixed_precision=args.mixed_precision)
    )
    org = build_planted(args.out, spec=spec, force=args.force, log=log, device=args.device)
    seconds = time.perf_counter() - start
    payload = {"path": str(org.path), "model_dir": str(org.model_dir), "spec": org.spec.name, "device": org.device,
               "mixed_precision": org.spec.finetune.mixed_precision, "report": org.report, "passed": org.passed,
               "seconds": round(seconds, 2)}  # fmt: skip
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        precision = "bfloat16 autocast" if org.spec.finetune.mixed_precision == "bf16" else "float32"
        print(f"organism  {org.spec.name}: a pretrained model with a planted shortcut, seed {org.spec.seed}, "
              f"fine-tuned on {org.device} ({precision})")  # fmt: skip
        print(f"written   {org.path}  (HF checkpoint in {org.model_dir})")
        print()
        print(org.to_frame().to_string(index=False))
        print()
        verdict = "all acceptance checks passed" if org.passed else "SOME ACCEPTANCE CHECKS FAILED"
        print(f"{verdict}; this command took {seconds:.1f} s")
    return 1 if args.strict and not org.passed else 0


def _cmd_organism(args: argparse.Namespace) -> int:
    if args.variant == "imdb-smollm2":
        return _cmd_planted(args)
    if args.mixed_precision != "auto":
        raise ValueError(f"--mixed-precision applies to --variant imdb-smollm2 only (the {args.variant} organism "
                         "trains from scratch in float32)")  # fmt: skip
    organism, seconds = _build(args, args.out)
    payload = _report(organism, seconds, as_json=args.json)
    return 1 if args.strict and not payload["passed"] else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from icp_lens.demo import run_demo

    demo = run_demo(args.out, progress=not args.json, log=(lambda _m: None) if args.json else print,
                    device=args.device)  # fmt: skip
    if args.json:
        print(json.dumps(demo.to_dict(), indent=2))
        return 0 if demo.verification_passed else 1
    print()
    print(demo.metrics.to_string(float_format=lambda x: f"{x:.3f}"))
    if demo.gap_closed is not None:
        print(f"worst-group gap to the oracle closed: {100 * demo.gap_closed:.0f}%")
    print()
    print(f"pruned {_pruned_text(demo)} ({100 * demo.zeroed_fraction:.3f}% of parameters zeroed)")
    verdict = "PASS" if demo.verification_passed else "FAIL"
    print(f"verification: max |logit diff| {demo.verification_error:.2e} vs hook ablation ({verdict})")
    for name, path in demo.paths.items():
        print(f"{name:>10}  {path}")
    print(f"done in {demo.seconds:.0f} s")
    return 0 if demo.verification_passed else 1


def _pruned_text(demo: Any) -> str:
    """What the demo pruned, e.g. ``2 token embedding(s) ('wow', 'meh') and 1 unit(s): mlp L0.3``."""
    n_units = len(demo.features)
    units, tokens = demo.pruned[:n_units], demo.tokens  # DemoResult.pruned: units, then tokens
    names = ", ".join(repr(t.token) if t.token is not None else f"id {t.token_id}" for t in tokens)
    text = f"{len(tokens)} token embedding(s)" + (f" ({names})" if tokens else "")
    return text + f" and {n_units} unit(s)" + (f": {', '.join(units)}" if units else "")

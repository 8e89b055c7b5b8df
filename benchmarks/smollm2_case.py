"""The SmolLM2-135M-Instruct gender case study, full size, from one command.

    python benchmarks/smollm2_case.py                 # the full case (FULL preset)
    python benchmarks/smollm2_case.py --reduced       # what CI runs (REDUCED preset)
    python benchmarks/smollm2_case.py --mode zero --verify-top 200

Scores every MLP neuron (46,080) and attention head (270) on the train pronoun probes
(hybrid: attribution for all, exact patching for the top ``--verify-top``), chooses
features on the train split (selectivity floor x k, explicit cues kept), prunes them into
an HF checkpoint, verifies it, and evaluates the original and the checkpoint on held-out
professions and templates, IMDB perplexity, the Wino-style set and CrowS-Pairs gender
pairs. Writes the run into ``--out`` (checkpoint, scores, grid, per-profession plot) and
copies the summary to ``benchmarks/results/smollm2_case.{md,json,png}`` (``--no-record``
to skip). See :mod:`examples.smollm2_case` (``examples/smollm2_case/``) for the method and the measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: examples/ (the case study) imports from the repository root
    sys.path.insert(0, str(ROOT))

from examples.smollm2_case import FULL, REDUCED, run_case  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2_case"))
    parser.add_argument("--reduced", action="store_true", help="the REDUCED preset (CI's size)")
    parser.add_argument("--mode", choices=["zero", "mean"], default=None)
    parser.add_argument("--verify-top", type=int, default=None)
    parser.add_argument("--n-imdb", type=int, default=None)
    parser.add_argument(
        "--max-perplexity-rise",
        type=float,
        default=None,
        help="the selection's perplexity guard; a negative value turns it off",
    )
    parser.add_argument("--no-record", action="store_true", help="do not copy results into benchmarks/results")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = REDUCED if args.reduced else FULL
    changes = {
        k: v
        for k, v in (("mode", args.mode), ("verify_top", args.verify_top), ("n_imdb", args.n_imdb))
        if v is not None
    }
    if args.max_perplexity_rise is not None:
        changes["max_perplexity_rise"] = None if args.max_perplexity_rise < 0 else args.max_perplexity_rise
    config = config.with_(**changes)
    result = run_case(config, out=args.out, progress=not args.no_progress)
    print((args.out / "results.md").read_text())
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        name = "smollm2_case_reduced" if args.reduced else "smollm2_case"
        shutil.copy(args.out / "results.md", RESULTS / f"{name}.md")
        shutil.copy(args.out / "per_profession.png", RESULTS / f"{name}.png")
        payload = json.loads((args.out / "results.json").read_text())
        payload["out"] = args.out.name  # the run's folder name only: no machine paths in the record
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
        print(f"recorded in {RESULTS / name}.{{md,json,png}}")
    return 0 if bool(result.table["met"].dropna().all()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

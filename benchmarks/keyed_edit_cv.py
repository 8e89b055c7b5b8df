"""The keyed MLP edit with its setting chosen by the CLI's own cross-validation, on SmolLM2 gender.

``benchmarks/keyed_edit.py`` chooses the layer and retain weight on *one* validation split
and found it a weak guide (every setting moved its four validation professions by at most
17%). Here one command does what a user would do, with no script-side selection:

    icp-lens edit --model SMOLLM2 --pairs pairs.jsonl --spec spec.json --guard task.jsonl \\
        --retain imdb.txt --ppl-texts imdb_val.txt \\
        --cv-layers 10,14,18,22 --cv-retain-weights 0.3,1,3 --cv-folds 4 --out edited

``icp-lens edit`` deals the seen professions into 4 folds (each group's values spread over
the folds), fits each candidate on the neutral swaps of the other folds' professions,
measures the spurious shift of the she/he margin on the fold's own professions (swaps
between groups), the explicit cues on the fold's share of ``task.jsonl`` and perplexity on
40 IMDB reviews that are not the retain text; it keeps the largest mean cut whose worst
fold holds explicit >= 0.95 and perplexity rise <= 3%, and fits it on all seen pairs. The
exported checkpoint is then measured once on the held-out professions and templates
(``spec_finetune.measure``, ``transformers`` alone). The spec, pairs and held-out split are
those of ``keyed_edit.md`` and ``spec_finetune.md``.

Run: ``python benchmarks/keyed_edit_cv.py [--model DIR] [--spec FILE --name NAME]``; writes
``benchmarks/results/NAME.{md,json}`` (default ``keyed_edit_cv``). An interrupted run resumes
from the command's own progress file. About 30 minutes on two CPU cores (32 fits).

``--spec benchmarks/specs/gender_blind.json --name keyed_edit_cv_blind`` is a blind test of
the rule: a word list and templates written after the rule was fixed (professions, relation
nouns, neutral nouns and templates that appear in no other spec or list of this
repository), run once, with the same candidates, folds and budgets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keyed_edit import BUDGET, heldout_summary, imdb_split, make_pairs  # noqa: E402
from spec_finetune import SPEC, markdown, measure  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CV_LAYERS, CV_WEIGHTS, N_FOLDS = "10,14,18,22", "0.3,3", 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="SmolLM2 checkpoint (default: converted offline)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default runs/keyed_edit[_NAME])")
    parser.add_argument("--spec", type=Path, default=None, help="a pair spec (default: spec_finetune's SPEC)")
    parser.add_argument("--name", default="keyed_edit_cv", help="results name (benchmarks/results/NAME.*)")
    args = parser.parse_args()
    spec = SPEC if args.spec is None else json.loads(args.spec.read_text())
    if args.work is None:
        args.work = Path("runs") / ("keyed_edit" if args.spec is None else f"keyed_edit_{args.name}")
    from icp_lens import loading

    if args.model is None:
        args.model = loading.prepare_offline_model(loading.SMOLLM2).path
    data, report = make_pairs(args.model, args.work, spec)
    _, val_texts, eval_texts = imdb_split(args.work)
    (args.work / "imdb_val.txt").write_text("\n".join(t.replace("\n", " ") for t in val_texts) + "\n")
    edited = args.work / "edited_cv"
    command = ["edit", "--model", str(args.model), "--pairs", str(data / "pairs.jsonl"), "--spec",
               str(args.work / "spec.json"), "--guard", str(data / "task.jsonl"), "--retain",
               str(args.work / "imdb.txt"), "--ppl-texts", str(args.work / "imdb_val.txt"), "--cv-layers", CV_LAYERS,
               "--cv-retain-weights", CV_WEIGHTS, "--cv-folds", str(N_FOLDS), "--min-explicit",
               str(BUDGET["explicit"]), "--max-ppl-rise", str(BUDGET["ppl_rise"]), "--out", str(edited),
               "--overwrite", "--json"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "icp_lens", *command], stdout=subprocess.PIPE, text=True)
    seconds = round(time.perf_counter() - start, 1)
    out: dict[str, Any] = {"spec": spec, "spec_file": None if args.spec is None else args.spec.as_posix(),
                           "heldout_values": report["heldout_values"], "budget": BUDGET,
                           "command": "icp-lens " + " ".join(command[:1] + ["..."] + command[-16:-2]),
                           "cli_seconds": seconds, "returncode": done.returncode}  # fmt: skip
    if done.returncode == 0:
        record = json.loads(done.stdout.strip().splitlines()[-1])
        out["cross_validation"] = record["cross_validation"]
        out["stats"] = record["stats"]
        out["cli_original"] = measure(args.model, data, eval_texts, spec)
        out["cli_edited"] = measure(edited, data, eval_texts, spec)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    text = report_md(out)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


def report_md(out: dict[str, Any]) -> str:
    text = (
        "# Keyed MLP edit: the setting chosen by `icp-lens edit`'s own 4-fold cross-validation\n\n"
        + ("`python benchmarks/keyed_edit_cv.py`: the spec and held-out split of `keyed_edit.md`. One command, no "
           if not out.get("spec_file") else
           f"`python benchmarks/keyed_edit_cv.py --spec {out['spec_file']}`: a blind test, on a spec written after the "
           "rule was fixed (its words and templates are in no other list of this repository), held-out split by "
           "`icp-lens pairs --holdout 0.3`, run once. One command, no ")
        + "script-side selection:\n\n```\n" + out["command"] + "\n```\n\n"
        f"Candidates: layers {CV_LAYERS} x retain weight {CV_WEIGHTS}; folds over the seen professions (values of "
        "both groups in every fold). Each fold: fitted on the other folds' neutral swaps, the spurious shift "
        "(`mean |m(x') - m(x)|` of the she/he margin, swaps between groups) measured on the fold's professions, "
        "explicit cues on the fold's share of task.jsonl, perplexity on 40 IMDB reviews that are not the retain "
        f"text. Rule (built into the command): the largest mean cut whose worst fold keeps explicit >= "
        f"{BUDGET['explicit']} and perplexity rise <= {BUDGET['ppl_rise']:.0%}.\n\n"
    )
    if out["returncode"] != 0:
        return text + f"The command failed (rc {out['returncode']}): no candidate was exported.\n"
    cv = out["cross_validation"]
    summary = pd.DataFrame(cv["summary"])
    summary["chosen"] = summary["chosen"].map({True: "yes", False: ""})
    text += "Folds: " + "; ".join(", ".join(f) for f in cv["folds"]) + ".\n\n" + markdown(summary) + "\n"
    o, e = out["cli_original"], out["cli_edited"]
    text += (
        f"\nChosen: layers {cv['chosen']['layers']}, retain weight {cv['chosen']['retain_weight']}, fitted on all seen "
        f"professions ({out['cli_seconds']} s for the whole command). Measured with `spec_finetune.measure` "
        f"(transformers alone) on the held-out professions and templates: {heldout_summary(o, e)}.\n"
    )
    for note in out.get("notes", []):
        text += f"\n{note}\n"
    return text


if __name__ == "__main__":
    main()

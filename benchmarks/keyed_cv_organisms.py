"""`icp-lens edit` choosing its own setting, with no group labels, on held-out planted-shortcut organisms.

For each organism (the held-out ones of ``directions_table.py``: tag x Llama seed 0,
lexical x NeoX seed 3, plus lexical x GPT-2 seed 0 that the tests use), one command:

    icp-lens edit --model ORG/model --pairs ORG/probe.jsonl --target mean \\
        --cv-layers 0,1,0+1 --cv-retain-weights 0.3,3 --cv-by pair --cv-folds 4 \\
        --retain train_prompts.txt --out edited

The probe pairs are training prompts and their spurious swaps; the command chooses the
layers and retain weight by 4-fold cross-validation over the prompts (the spurious shift
of the answer's margin on held-out prompts, perplexity on every third retain prompt), so
no group label and no test prompt is read. The exported checkpoint is then measured on
the test splits against the original and the oracle (trained without the shortcut):
worst-group gap closed = (worst after - worst before) / (oracle worst - worst before).

``--planted`` adds the real model with a planted shortcut (``icp-lens organism --variant
imdb-smollm2``: SmolLM2-135M on IMDB reviews with a reviewer name), with the candidates
layers 5, 13, 21, 29 each alone x retain weight 0.3, 3 (every fourth of the 30 blocks; a
fold there takes minutes, so the grid is half the one ``directions_table.py`` chose from
with validation group labels) and retain = 64 training prompts, as there.

Run: ``python benchmarks/keyed_cv_organisms.py [--planted]``; writes
``benchmarks/results/keyed_cv_organisms.{md,json}``. A few minutes on two CPU cores
(about an hour more with ``--planted``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
ORGANISMS = (("tag", "llama", 0), ("lexical", "neox", 3), ("lexical", "gpt2", 0))
#: the real model's candidates (every fourth block) and retain prompts
PLANTED_LAYERS, PLANTED_RETAIN = (5, 13, 21, 29), 64
#: the command's perplexity budget; where no candidate meets it, the run is repeated once with the second (the
#: finished folds are reused) and the row says so: the budget is a user's choice, reported, never hidden
BUDGETS = (0.03, 0.10)


def _accuracies(model_dir: Path, splits: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.organisms.planted import planted_accuracy

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = {}
    for name, examples in splits.items():
        r = planted_accuracy(model, tok, examples)
        out[name] = {"accuracy": float(r["accuracy"]), "worst": float(r["worst"])}
    return out


def _organisms(planted: bool) -> list[tuple[str, Callable[[], Any], Callable[[Any], str], int]]:
    """(row name, organism builder, --cv-layers of the organism, retain prompts) of each organism to run."""
    from icp_lens.organisms import build_organism

    def every_layer(org: Any) -> str:
        from transformers import AutoConfig

        n = int(AutoConfig.from_pretrained(str(org.model_dir)).num_hidden_layers)
        return ",".join([*map(str, range(n)), "+".join(map(str, range(n)))])

    out: list[tuple[str, Callable[[], Any], Callable[[Any], str], int]] = [
        (f"{variant} x {arch} seed {seed}", partial(build_organism, variant=variant, arch=arch, seed=seed),
         every_layer, 256)
        for variant, arch, seed in ORGANISMS
    ]  # fmt: skip
    if planted:
        from icp_lens.organisms.planted import PlantedSpec, build_planted, resolve_precision

        spec = resolve_precision(PlantedSpec(), "cpu")  # auto: the float32 build where bfloat16 is slow
        name = f"imdb x smollm2 seed {spec.seed} ({spec.finetune.mixed_precision})"
        out.append((name, partial(build_planted, spec=spec, log=print),
                    lambda _org: ",".join(map(str, PLANTED_LAYERS)), PLANTED_RETAIN))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--planted", action="store_true", help="also the real model (imdb-smollm2; about an hour)")
    args = parser.parse_args()
    rows = []
    saved = RESULTS / "keyed_cv_organisms.json"
    previous = {r["organism"]: r for r in json.loads(saved.read_text()) if "error" not in r} if saved.exists() else {}
    for key, build, cv_layers, n_retain in _organisms(args.planted):
        if key in previous:
            rows.append(previous[key])
            continue
        org = build()
        layers = cv_layers(org)
        splits = {s: org.probes(s) for s in ("test_id", "test_balanced")}
        work = Path(tempfile.mkdtemp(prefix="icp-cv-"))
        (work / "retain.txt").write_text("\n".join(ex.prompt for ex in org.probes("train")[:n_retain]) + "\n")
        command = ["edit", "--model", str(org.model_dir), "--pairs", str(org.data_path("probe")), "--target", "mean",
                   "--cv-layers", layers, "--cv-retain-weights", "0.3,3", "--cv-by", "pair", "--cv-folds", "4",
                   "--retain", str(work / "retain.txt"), "--out", str(work / "edited"), "--json"]  # fmt: skip
        start = time.perf_counter()
        budget = BUDGETS[0]
        done = subprocess.run([sys.executable, "-m", "icp_lens", *command], capture_output=True, text=True)
        if done.returncode == 2 and "no candidate kept" in done.stderr:  # the folds are kept: the rerun reuses them
            budget = BUDGETS[1]
            done = subprocess.run([sys.executable, "-m", "icp_lens", *command, "--max-ppl-rise", str(budget)],
                                  capture_output=True, text=True)  # fmt: skip
        seconds = round(time.perf_counter() - start, 1)
        if done.returncode != 0:
            rows.append({"organism": key, "error": done.stderr.strip().splitlines()[-1]})
            continue
        record = json.loads(done.stdout.strip().splitlines()[-1])
        before = _accuracies(org.model_dir, splits)
        after = _accuracies(work / "edited", splits)
        oracle = _accuracies(org.oracle_dir, splits)
        wb, wa, wo = (m["test_balanced"]["worst"] for m in (before, after, oracle))
        chosen = record["cross_validation"]["chosen"]
        summary = pd.DataFrame(record["cross_validation"]["summary"])
        rows.append({
            "organism": key, "max_ppl_rise": budget, "candidates": len(summary),
            "chosen": f"L{','.join(map(str, chosen['layers']))} w{chosen['retain_weight']:g}",
            "cv_mean_cut": float(summary.loc[summary.chosen, "mean_cut"].iloc[0]),
            "worst_before": wb, "worst_after": wa, "worst_oracle": wo,
            "worst_gap_closed": (wa - wb) / (wo - wb) if wo != wb else None,
            "balanced_before": before["test_balanced"]["accuracy"],
            "balanced_after": after["test_balanced"]["accuracy"],
            "id_before": before["test_id"]["accuracy"], "id_after": after["test_id"]["accuracy"],
            "id_oracle": oracle["test_id"]["accuracy"], "changed_parameters": record["stats"]["changed_parameters"],
            "seconds": seconds,
        })  # fmt: skip
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "keyed_cv_organisms.json").write_text(json.dumps(rows, indent=2) + "\n")
    frame = pd.DataFrame(rows)
    frame = frame[["organism"] + [c for c in frame.columns if c != "organism"]]
    text = (
        "# `icp-lens edit --cv-layers`: the keyed edit's setting chosen by the command, no group labels\n\n"
        "`python benchmarks/keyed_cv_organisms.py`: `--target mean` on the probe pairs (training prompts and their "
        "spurious swaps), candidates = each layer alone and all layers x retain weight 0.3, 3, 4-fold "
        "cross-validation over prompts (`--cv-by pair`; the spurious value has only two words); retain = 256 "
        "training prompts; perplexity on every third of them. Budget: explicit cues are not checked (the organisms' "
        "probes have no guard prompts), perplexity rise <= 3%; where no candidate meets it the command is repeated "
        "with <= 10% (column `max_ppl_rise`): the perplexity texts carry the spurious tag, so removing its effect "
        "moves their predictions too. Measured on the test splits. Worst-group gap closed = (after - before) / "
        "(oracle - before). The imdb x smollm2 row (`--planted`: the real model with a planted reviewer name; its "
        "build's mixed precision in brackets) takes candidates layers 5, 13, 21, 29 each alone x retain weight "
        "0.3, 3 and retain = 64 training prompts (perplexity on every third: 21 reviews), for time.\n\n"
        "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
        + "\n".join("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |"
                    for r in frame.itertuples(index=False))
        + "\n"
    )  # fmt: skip
    (RESULTS / "keyed_cv_organisms.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

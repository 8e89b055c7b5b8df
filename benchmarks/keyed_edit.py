"""The keyed MLP edit (`icp-lens edit`, no training) on SmolLM2 gender, from our own spec.

The same spec, pairs and held-out split as ``benchmarks/spec_finetune.py`` (the pair
recipe's fine-tune), so the two methods sit side by side:

1. ``icp-lens pairs --spec SPEC --holdout 0.3`` (spec_finetune's ``SPEC``): 30% of the
   values and templates never reach ``pairs.jsonl`` / ``task.jsonl``;
2. a *validation* split carved from the seen values: the last two seen professions of
   each group (in spec order). The edit is fitted on the *neutral* swaps (profession ->
   "person", ...) of the other seen professions, guarded by ``task.jsonl`` (explicit
   cues) and 60 IMDB reviews (the retain text);
3. every candidate (layers x retain weight) is measured on the validation professions
   (their gap, the explicit cues, perplexity on 40 other IMDB reviews) and on the held-out
   files; the rule, on validation only: the largest validation gap cut with explicit-cue
   accuracy >= 0.95 and perplexity rise <= 3%;
4. the chosen setting is run once more through the CLI (``icp-lens edit``) and the
   exported checkpoint measured with ``transformers`` alone on the held-out files, with
   ``spec_finetune.measure`` (the pair recipe's columns).

Run: ``python benchmarks/keyed_edit.py [--model DIR]``; writes
``benchmarks/results/keyed_edit.{md,json}`` (the candidates are saved as they finish:
an interrupted run keeps them). About 30 minutes on two CPU cores (30 candidates).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_finetune import SPEC, cli, markdown, measure  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CANDIDATES = [
    {"layers": layers, "retain_weight": w}
    for layers in ((6,), (10,), (14,), (18,), (22,), (6, 10))
    for w in (0.3, 1.0, 3.0, 10.0, 30.0)
]
BUDGET = {"explicit": 0.95, "ppl_rise": 0.03}


def _words(ex: Any) -> tuple[str, str]:
    """(prompt's value, counterfactual's value): the words where the two differ."""
    from icp_lens.keyed_choice import swap_values

    return swap_values(ex)


def _measure(model: Any, tok: Any, swaps: list[Any], task: list[Any], texts: list[str]) -> dict[str, float]:
    """spec_finetune.measure's gap / explicit / perplexity, in memory."""
    from icp_lens.evaluation.margins import next_token_margins
    from icp_lens.evaluation.perplexity import perplexity

    first = next(iter(SPEC["spurious"]))
    unique = list({p.prompt: p for p in swaps}.values())
    with torch.no_grad():
        m = next_token_margins(model, tok, unique)
        toward = np.array([v if p.group == first else -v for v, p in zip(m, unique, strict=True)])
        groups = np.array([p.group for p in unique])
        gap = float(toward[groups == first].mean() - toward[groups != first].mean())
        explicit = float((next_token_margins(model, tok, task) > 0).mean())
        ppl = float(perplexity(model, tok, texts).perplexity)
    return {"gap": gap, "explicit": explicit, "ppl": ppl}


def make_pairs(model: Path, work: Path, spec: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """``icp-lens pairs --spec SPEC --holdout 0.3`` into ``work/pairs`` (reused when already made from this spec;
    ``spec``: another one than spec_finetune's ``SPEC``)."""
    work.mkdir(parents=True, exist_ok=True)
    spec_text = json.dumps(SPEC if spec is None else spec, indent=2)
    data = work / "pairs"
    spec_file = work / "spec.json"
    if not (data / "report.json").exists() or not spec_file.exists() or spec_file.read_text() != spec_text:
        spec_file.write_text(spec_text)
        cli("pairs", "--spec", str(spec_file), "--model", str(model), "--out", str(data), "--holdout", "0.3",
            "--overwrite")  # fmt: skip
    return data, json.loads((data / "report.json").read_text())


def imdb_split(work: Path) -> tuple[list[str], list[str], list[str]]:
    """(retain: 60 IMDB reviews, also written to ``work/imdb.txt``; 40 others for validation perplexity; 40 eval)."""
    from icp_lens.data import imdb_texts

    select = imdb_texts("select", 100)
    retain, val_texts, eval_texts = select[:60], select[60:100], imdb_texts("eval", 40)
    (work / "imdb.txt").write_text("\n".join(t.replace("\n", " ") for t in retain) + "\n")
    return retain, val_texts, eval_texts


def heldout_summary(o: dict[str, float], e: dict[str, float]) -> str:
    """``spec_finetune.measure``'s numbers, original ``o`` -> edited ``e``, as one clause."""
    return (
        f"gap {o['gap_heldout']:.3f} -> {e['gap_heldout']:.3f} (cut {1 - e['gap_heldout'] / o['gap_heldout']:.1%}), "
        f"held-out flips {o['flips_heldout']:.3f} -> {e['flips_heldout']:.3f}, seen gap cut "
        f"{1 - e['gap_seen'] / o['gap_seen']:.1%}, explicit held out {e['explicit_heldout']:.3f}, perplexity "
        f"{o['ppl']:.2f} -> {e['ppl']:.2f} ({e['ppl'] / o['ppl'] - 1:+.1%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="SmolLM2 checkpoint (default: converted offline)")
    parser.add_argument("--work", type=Path, default=Path("runs") / "keyed_edit", help="scratch folder")
    args = parser.parse_args()
    from icp_lens import loading
    from icp_lens.cli_edit import neutral_pairs
    from icp_lens.keyed_edit import keyed_edit
    from icp_lens.probes import read_probes, write_probes
    from icp_lens.pruning.source import load_checkpoint, load_tokenizer

    if args.model is None:
        args.model = loading.prepare_offline_model(loading.SMOLLM2).path
    work = args.work
    data, report = make_pairs(args.model, work)
    held = report["heldout_values"]["spurious"]
    seen = {g: [v for v in vals if v not in held[g]] for g, vals in SPEC["spurious"].items()}
    val_values = {v for vals in seen.values() for v in vals[-2:]}
    neutral = SPEC["neutral"]
    pairs = read_probes(data / "pairs.jsonl")
    to_neutral = neutral_pairs(pairs, neutral)
    fit = [p for p in to_neutral if _words(p)[0] not in val_values]
    neutral_set = set(to_neutral)
    swaps = [p for p in pairs if p not in neutral_set]
    val_swaps = [p for p in swaps if _words(p)[0] in val_values]
    heldout_pairs = read_probes(data / "heldout_pairs.jsonl")
    held_neutral = set(neutral_pairs(heldout_pairs, neutral))
    held_swaps = [p for p in heldout_pairs if p not in held_neutral]
    task, held_task = read_probes(data / "task.jsonl"), read_probes(data / "heldout_task.jsonl")
    retain, val_texts, eval_texts = imdb_split(work)
    write_probes(work / "fit_pairs.jsonl", fit)

    tok = load_tokenizer(args.model)
    base = load_checkpoint(args.model)
    out: dict[str, Any] = {"spec": SPEC, "val_values": sorted(val_values), "heldout_values": report["heldout_values"],
                           "n_fit_pairs": len(fit), "n_val_swaps": len(val_swaps), "n_heldout_swaps": len(held_swaps),
                           "budget": BUDGET, "candidates": []}  # fmt: skip
    out["base"] = {"val": _measure(base, tok, val_swaps, task, val_texts),
                   "heldout": _measure(base, tok, held_swaps, held_task, eval_texts)}  # fmt: skip
    print("base", out["base"], flush=True)
    RESULTS.mkdir(exist_ok=True)

    def save() -> None:
        (RESULTS / "keyed_edit.json").write_text(json.dumps(out, indent=2, default=float) + "\n")

    previous = RESULTS / "keyed_edit.json"
    done: dict[tuple, Any] = {}
    if previous.exists():  # a rerun keeps the candidates an earlier run of the same split measured
        old = json.loads(previous.read_text())
        if old.get("spec") == SPEC and old.get("val_values") == out["val_values"]:
            done = {(tuple(r["layers"]), r["retain_weight"]): r for r in old.get("candidates", [])}
    for cand in CANDIDATES:
        if (tuple(cand["layers"]), cand["retain_weight"]) in done:
            out["candidates"].append(done[(tuple(cand["layers"]), cand["retain_weight"])])
            continue
        model = load_checkpoint(args.model)
        stats = keyed_edit(model, tok, fit, layers=cand["layers"], guard=[t.prompt for t in task], retain=retain,
                           retain_weight=cand["retain_weight"], progress=False)  # fmt: skip
        row: dict[str, Any] = {"layers": list(cand["layers"]), "retain_weight": cand["retain_weight"],
                               "seconds": stats.seconds, "fit_residual": list(stats.fit_residual)}  # fmt: skip
        for split, (sw, tk, tx) in {"val": (val_swaps, task, val_texts),
                                    "heldout": (held_swaps, held_task, eval_texts)}.items():  # fmt: skip
            m = _measure(model, tok, sw, tk, tx)
            b = out["base"][split]
            row[split] = {**m, "cut": 1 - m["gap"] / b["gap"], "ppl_rise": m["ppl"] / b["ppl"] - 1}
        out["candidates"].append(row)
        print(f"layers {row['layers']} w {row['retain_weight']}: val cut {row['val']['cut']:.3f} "
              f"ppl {row['val']['ppl_rise']:+.3f} | heldout cut {row['heldout']['cut']:.3f} "
              f"ppl {row['heldout']['ppl_rise']:+.3f}", flush=True)  # fmt: skip
        save()
    ok = [r for r in out["candidates"]
          if r["val"]["explicit"] >= BUDGET["explicit"] and r["val"]["ppl_rise"] <= BUDGET["ppl_rise"]]  # fmt: skip
    chosen = max(ok, key=lambda r: r["val"]["cut"]) if ok else None
    out["chosen"] = None if chosen is None else {"layers": chosen["layers"], "retain_weight": chosen["retain_weight"]}
    if chosen is not None:
        edited = work / "edited"
        start = time.perf_counter()
        cli("edit", "--model", str(args.model), "--pairs", str(work / "fit_pairs.jsonl"), "--layers",
            ",".join(map(str, chosen["layers"])), "--guard", str(data / "task.jsonl"), "--retain",
            str(work / "imdb.txt"), "--retain-weight", str(chosen["retain_weight"]), "--spec", str(work / "spec.json"),
            "--out", str(edited),
            "--overwrite", "--json")  # fmt: skip
        out["cli_seconds"] = round(time.perf_counter() - start, 1)
        out["cli_original"] = measure(args.model, data, eval_texts, SPEC)
        out["cli_edited"] = measure(edited, data, eval_texts, SPEC)
    save()
    (RESULTS / "keyed_edit.md").write_text(report_md(out))
    print(report_md(out))


def report_md(out: dict[str, Any]) -> str:
    rows = [{"layers": "original", "retain_weight": None, **{f"{s}_{k}": out["base"][s][k] for s in ("val", "heldout")
                                                              for k in ("gap", "explicit", "ppl")}}]  # fmt: skip
    for r in out["candidates"]:
        chosen = out.get("chosen") or {}
        rows.append({"layers": ",".join(map(str, r["layers"])), "retain_weight": r["retain_weight"],
                     **{f"{s}_{k}": r[s][k] for s in ("val", "heldout")
                        for k in ("gap", "cut", "explicit", "ppl_rise")},
                     "chosen": "yes" if chosen.get("layers") == r["layers"]
                     and chosen.get("retain_weight") == r["retain_weight"] else "",
                     "seconds": r["seconds"]})  # fmt: skip
    cols = ["layers", "retain_weight", "val_gap", "val_cut", "val_explicit", "val_ppl_rise", "heldout_gap",
            "heldout_cut", "heldout_explicit", "heldout_ppl_rise", "chosen", "seconds"]  # fmt: skip
    frame = pd.DataFrame(rows)
    text = (
        "# Keyed MLP edit (`icp-lens edit`, no training): SmolLM2 gender from our own spec\n\n"
        "`python benchmarks/keyed_edit.py`: spec, pairs and held-out split of `spec_finetune.md`; validation "
        f"professions {', '.join(out['val_values'])} (carved from the seen ones, left out of the fit); "
        f"{out['n_fit_pairs']} neutral swaps fitted, guard = task.jsonl, retain = 60 IMDB reviews. Rule (validation "
        f"only): the largest validation gap cut with explicit >= {BUDGET['explicit']} and perplexity rise <= "
        f"{BUDGET['ppl_rise']:.0%}. Perplexity: 40 other IMDB reviews (val), the eval reviews (held out).\n\n"
        + markdown(frame[[c for c in cols if c in frame]])
        + "\n"
    )
    if out.get("cli_edited"):
        o, e = out["cli_original"], out["cli_edited"]
        text += (
            f"\nThe chosen setting through the CLI (`icp-lens edit`, {out['cli_seconds']} s), measured with "
            f"`spec_finetune.measure` (transformers alone): held-out {heldout_summary(o, e)}.\n"
        )
        recipe = RESULTS / "spec_finetune.json"
        if recipe.exists():
            trained = [r for r in json.loads(recipe.read_text())["rows"] if r["model"] != "original"]
            cuts = " / ".join(f"{r['gap_cut_heldout']:.1%}" for r in trained)
            ppl = " / ".join(f"{r['ppl_change']:+.1%}" for r in trained)
            text += f"The pair recipe's fine-tune on the same split (`spec_finetune.md`): held-out cut {cuts}, "
            text += f"perplexity {ppl}.\n"
    elif "chosen" in out:
        text += "\nNo candidate met the validation budget; nothing was exported.\n"
    return text


if __name__ == "__main__":
    main()

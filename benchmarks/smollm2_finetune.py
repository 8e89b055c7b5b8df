"""Invariance fine-tuning on the SmolLM2-135M gender case: counterfactual consistency on seen and held-out professions.

    python benchmarks/smollm2_finetune.py                  # ERM, consistency, CLP, invariance; 30 steps, seed 0
    python benchmarks/smollm2_finetune.py --seeds 0 1 --steps 40
    python benchmarks/smollm2_finetune.py --reduced        # a quick look (ERM vs consistency, small samples)

Trains LoRA adapters on SmolLM2-135M-Instruct with every method in the same loop and
budget (:mod:`examples.smollm2_case.finetune`): the task term on explicit-cue prompts,
the pair terms on the ambiguous train-split profession prompts and their
profession-swapped counterfactuals. Measures the original and each trained model on the
train (seen) and eval (held-out) professions: flip rate under the swap, mean |delta
margin|, stereotype gap; explicit-cue accuracy; IMDB perplexity (the case study's
evaluation reviews); then checks issue 7's targets. The invariance method regularises
the features the pruning case chose (``benchmarks/results/smollm2_case.json``; another
file with ``--features-from``). Writes ``benchmarks/results/smollm2_finetune{,_reduced}``
``.{md,json,png}`` (``--no-record``: print only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: examples/ (the case study) imports from the repository root
    sys.path.insert(0, str(ROOT))

from examples.smollm2_case.finetune import METHODS, FinetuneConfig, FinetuneResult, run_finetune  # noqa: E402
from examples.smollm2_case.run import _md  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PRUNING_CUT = "smollm2_case.json"


def _table(result: FinetuneResult) -> pd.DataFrame:
    """The headline table: one row per method (mean over seeds)."""
    s = result.summary
    return pd.DataFrame({
        "method": s["method"], "seeds": s["n_seeds"],
        "flip seen": s["flip_rate_train"], "flip held-out": s["flip_rate_eval"],
        "|dmargin| seen": s["abs_shift_train"], "|dmargin| held-out": s["abs_shift_eval"],
        "gap held-out": s["gap_eval"], "gap cut held-out": s["gap_cut_eval"],
        "explicit acc held-out": s["explicit_accuracy_eval"], "IMDB ppl": s["perplexity_imdb"],
        "ppl change": s["perplexity_rise"], "train s": s["train_seconds"], "eval s": s["eval_seconds"],
    })  # fmt: skip


def _staged_steps(result: FinetuneResult) -> str:
    """How many steps the ``consistency_staged`` runs took in all, per seed (early stopping picks the length)."""
    runs = result.runs[result.runs["method"] == "consistency_staged"]
    if runs.empty:
        return ""
    return f"; it ran {', '.join(str(int(n)) for n in runs['steps'])} steps in all (per seed)"


def _professions(result: FinetuneResult) -> pd.DataFrame:
    """Held-out per-profession margins, one column per method (mean over seeds)."""
    p = result.professions[result.professions["split"] == "eval"]
    wide = p.pivot_table(index=["profession", "group"], columns="method", values="margin", sort=False)
    wide = wide[[m for m in result.summary["method"] if m in wide.columns]]
    return wide.sort_values("original", ascending=False).reset_index()


def group_means(professions: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Held-out mean she-he margin per stereotype group and method (over professions, templates and seeds).

    The flip rate cannot tell "the profession no longer matters" from "every profession now
    gets the same pronoun": a model that says " he" after every profession never flips. The
    two group means and their midpoint (> 0: leans " she") show which one happened.
    """
    p = professions[professions["split"] == "eval"]
    means = p.groupby(["method", "group"])["margin"].mean().unstack("group")
    means = means.reindex([m for m in methods if m in means.index])
    means["midpoint"] = means.mean(axis=1)
    return means.reset_index()


def plot(result: FinetuneResult) -> Any:
    """Held-out professions: she-he margin of the original and of every trained method."""
    import matplotlib.pyplot as plt

    wide = _professions(result).sort_values("original")
    methods = [c for c in wide.columns if c not in ("profession", "group")]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(wide) + 1.5))
    height = 0.8 / len(methods)
    colors = {"original": "#bbbbbb", "erm": "#7f7f7f", "consistency": "#c0392b", "clp": "#2874a6",
              "invariance": "#27ae60", "consistency_wide": "#8e44ad", "consistency_staged": "#d35400"}  # fmt: skip
    for j, m in enumerate(methods):
        ys = [i + 0.4 - (j + 0.5) * height for i in range(len(wide))]
        ax.barh(ys, wide[m], height=height, label=m, color=colors.get(m))
    ax.set_yticks(range(len(wide)), [f"{p} ({g[0]})" for p, g in zip(wide["profession"], wide["group"], strict=True)])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("logit(' she') - logit(' he'), mean over held-out templates")
    ax.set_title("SmolLM2-135M, held-out professions: before and after fine-tuning")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def markdown(result: FinetuneResult, pruning_cut: float | None, command: str) -> str:
    c = result.config
    history = result.history
    last = history[history["kind"] == "train"].groupby(["method", "seed"]).tail(1) if len(history) else None
    terms = [t for t in ("task", "consistency", "clp", "invariance", "loss") if last is not None and t in last]
    lines = [
        "# SmolLM2-135M-Instruct: invariance fine-tuning vs the profession -> pronoun shortcut",
        "",
        f"`{command}` ({result.seconds:.0f} s). LoRA r={c.lora_r} on every projection, {c.steps} steps, "
        f"lr {c.lr:g}, batch {c.batch_size} explicit-cue prompts + up to {c.batch_size} profession pairs per step, "
        f"seeds {list(c.seeds)}; pair terms compare the `{c.representation}` distribution. Task term: she/he "
        "cross-entropy on the train-split explicit-cue prompts; pair terms: the 60 train-split profession prompts "
        "and their swaps (`consistency_wide`: lam 0.15 on the wide pool of `examples.smollm2_case.wide_pairs`, "
        "train-split and 34 extra professions, every same-length swap and swaps to a neutral noun, 11 templates, plus "
        "the retain term on IMDB selection reviews and neutral-noun prompts; `consistency_staged`: the same, then "
        f"at most {c.seen_steps} more steps with the same loss on the 60 train-split prompts alone, stopped "
        f"{c.seen_patience} flip-rate checks of those prompts (every {c.seen_check_every} steps) after the last drop, "
        f"keeping the earliest weights with the fewest flips{_staged_steps(result)}). "
        "Held-out = the eval split's professions and templates (never trained on, never used "
        f"to choose settings). IMDB perplexity: {c.n_imdb} evaluation reviews x {c.imdb_tokens} tokens."
        + (f" Invariance regularises {', '.join(c.features)}." if "invariance" in c.methods else ""),
        "",
        _md(_table(result)),
        "",
        "flip = share of prompts whose pronoun choice (sign of the she-he margin) changes when the profession is "
        "swapped for one of the opposite stereotype; |dmargin| = mean |margin(x_cf) - margin(x)|; "
        "gap cut = 1 - gap / original gap"
        + (f" (pruning, `{PRUNING_CUT}`: {pruning_cut:.1%} within the 3% perplexity budget)." if pruning_cut else "."),
        "",
        "## Targets (issue 7)",
        "",
        _md(result.targets),
        "",
        "## Held-out professions: mean she-he margin per group",
        "",
        _md(group_means(result.professions, list(result.summary["method"]))),
        "",
        "A low flip rate with both group means on one side of 0 is a pronoun default, not a removed shortcut; "
        "the gap (female minus male mean) is the stereotype that remains.",
        "",
        "## Held-out professions: she-he margin",
        "",
        _md(_professions(result)),
        "",
    ]
    if last is not None and terms:
        lines += ["## Last logged loss terms", "", _md(last[["method", "seed", "step", *terms]]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help=f"from {list(METHODS)} (default: all)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n-imdb", type=int, default=None)
    parser.add_argument("--reduced", action="store_true", help="ERM and consistency, 8 steps, small samples")
    parser.add_argument("--features-from", type=Path, default=RESULTS / PRUNING_CUT,
                        help="case-study results JSON: the invariance method regularises its 'features'")  # fmt: skip
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/results")
    args = parser.parse_args(argv)
    reduced = FinetuneConfig(methods=("erm", "consistency"), steps=8, batch_size=8, n_imdb=8, imdb_tokens=64)
    base = reduced if args.reduced else FinetuneConfig()
    methods = tuple(args.methods) if args.methods else (base.methods if args.reduced else tuple(METHODS))
    pruning = json.loads(args.features_from.read_text()) if args.features_from.is_file() else {}
    if "invariance" in methods and not pruning.get("features"):
        parser.error(f"invariance needs the features of a case-study run: {args.features_from.name} has none")
    changes = {"steps": args.steps, "seeds": tuple(args.seeds) if args.seeds else None, "lr": args.lr,
               "batch_size": args.batch_size, "n_imdb": args.n_imdb}  # fmt: skip
    config = FinetuneConfig(**{**base.to_dict(), "methods": methods, "features": tuple(pruning.get("features", ())),
                               **{k: v for k, v in changes.items() if v is not None}})  # fmt: skip
    tic = time.perf_counter()
    result = run_finetune(config)
    command = "python benchmarks/smollm2_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, pruning.get("gap_cut") if args.features_from.name == PRUNING_CUT else None, command.strip())
    print(text)
    print(f"total {time.perf_counter() - tic:.0f} s")
    if not args.no_record:
        name = "smollm2_finetune_reduced" if args.reduced else "smollm2_finetune"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.md").write_text(text)
        payload = {**result.to_dict(), "command": command.strip(), "features_from": args.features_from.name}
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
        fig = plot(result)
        fig.savefig(RESULTS / f"{name}.png", dpi=110)
        print(f"recorded in {RESULTS.name}/{name}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

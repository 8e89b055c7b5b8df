"""The SmolLM2-135M gender case study, end to end: score, select, prune, export, verify, evaluate.

On SmolLM2-135M-Instruct, "Yesterday the nurse wrote that" prefers " she" and "Yesterday
the mechanic wrote that" prefers " he": the profession, a spurious attribute, drives
the pronoun. :func:`run_case`

1. scores every MLP neuron and attention head (``config.kinds`` over ``config.layers``)
   with the hybrid scorer on the **train** pronoun probes: attribution ranks all
   46,080 neurons and 270 heads, exact patching verifies the top ``verify_top``; the
   spurious intervention swaps the profession, the causal one an explicit gendered
   word, so every feature gets a selectivity;
2. chooses the features on the train split only, with a perplexity guard on IMDB
   reviews kept apart from the evaluation's (:mod:`examples.smollm2_case.selection`);
3. makes a ``PrunePlan`` (``config.mode``; mean mode averages each feature over
   ordinary text, see ``CaseConfig.mean_reference``), exports the edited checkpoint
   and verifies it (reloaded with ``transformers`` alone, against the run-time ablation);
4. evaluates the original and the exported checkpoint on held-out professions and
   templates (:mod:`examples.smollm2_case.measures`);
5. writes ``scores.csv``, ``selection_grid.csv``, ``checkpoint/`` (with ``plan.json``),
   ``per_profession.csv``, ``per_profession.png``, ``results.json`` and ``results.md``
   into ``out``.

The exact scores are checkpointed under ``out/score_checkpoint`` so an interrupted run
resumes its exact verification.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from examples.smollm2_case.config import FULL, CaseConfig
from icp_lens.features import Feature
from icp_lens.jsonsafe import jsonable

_jsonable = jsonable  # the former private name, kept for code that imported it

__all__ = ["CaseResult", "run_case", "results_table", "plot_professions"]


@dataclass(frozen=True)
class CaseResult:
    """What the case study measured and where it wrote it.

    ``table``: one row per measure (``measure, before, after, change, target, met``);
    ``before`` / ``after``: every measure of :func:`~examples.smollm2_case.measures.bias_measures`;
    ``professions``: per-profession margins before and after (eval split);
    ``grid``: the train-split selection grid; ``chosen``: its chosen row;
    ``verification``: the export's ``VerificationReport`` as a dict; ``seconds``: per stage.
    """

    out: Path
    config: CaseConfig
    features: tuple[Feature, ...]
    table: pd.DataFrame
    before: dict[str, float]
    after: dict[str, float]
    professions: pd.DataFrame
    grid: pd.DataFrame
    chosen: dict[str, Any]
    verification: dict[str, Any]
    zeroed_fraction: float
    n_scored: int
    n_exact: int
    seconds: dict[str, float]

    @property
    def gap_cut(self) -> float:
        """``1 - gap_after / gap_before`` on the held-out split."""
        return 1 - self.after["stereotype_gap"] / self.before["stereotype_gap"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "config": self.config.to_dict(),
            "features": [str(f) for f in self.features],
            "gap_cut": self.gap_cut,
            "before": self.before,
            "after": self.after,
            "table": self.table.to_dict(orient="records"),
            "chosen": self.chosen,
            "verification": self.verification,
            "zeroed_fraction": self.zeroed_fraction,
            "n_scored": self.n_scored,
            "n_exact": self.n_exact,
            "seconds": self.seconds,
        }


def results_table(
    before: dict[str, float], after: dict[str, float], verification: dict[str, Any], config: CaseConfig,
    seconds: float | None = None,
) -> pd.DataFrame:  # fmt: skip
    """The before/after table with each target and whether it is met."""
    t = config.targets
    cut = 1 - after["stereotype_gap"] / before["stereotype_gap"]
    rise = after["perplexity_imdb"] / before["perplexity_imdb"] - 1
    diff = verification.get("max_abs_logit_diff", float("nan"))
    rows = [
        ("stereotype gap (eval)", before["stereotype_gap"], after["stereotype_gap"], f"cut {cut:.1%}",
         f"cut >= {t['gap_cut']:.0%}", cut >= t["gap_cut"]),
        ("explicit-cue accuracy (eval)", before["explicit_accuracy"], after["explicit_accuracy"],
         f"{after['explicit_accuracy'] - before['explicit_accuracy']:+.3f}", f">= {t['explicit_accuracy']:.0%}",
         after["explicit_accuracy"] >= t["explicit_accuracy"]),
        ("IMDB perplexity", before["perplexity_imdb"], after["perplexity_imdb"], f"{rise:+.2%}",
         f"rise <= {t['perplexity_rise']:.0%}", rise <= t["perplexity_rise"]),
        ("Wino pro-stereotype preference", before["wino_pro_preference"], after["wino_pro_preference"],
         f"{after['wino_pro_preference'] - before['wino_pro_preference']:+.3f}", "toward 0.5", None),
        ("CrowS-Pairs gender score", before["crows_gender_score"], after["crows_gender_score"],
         f"{after['crows_gender_score'] - before['crows_gender_score']:+.3f}", "toward 0.5", None),
        ("stereotype gap (train, in-sample)", before["stereotype_gap_train"], after["stereotype_gap_train"],
         f"cut {1 - after['stereotype_gap_train'] / before['stereotype_gap_train']:.1%}", "-", None),
        ("export vs run-time ablation, max |logit diff|", None, diff, "-", f"<= {t['verify']:.0e}",
         bool(diff <= t["verify"])),
    ]  # fmt: skip
    hooked = verification.get("hooked_max_abs_logit_diff")
    if hooked is not None:
        rows.append(("export vs icp_lens hook ablation (bridge), max |logit diff|", None, hooked,
                     f"bridge vs HF floor {verification.get('implementation_floor') or 0:.1e}", f"<= {t['verify']:.0e}",
                     bool(hooked <= t["verify"])))  # fmt: skip
    if seconds is not None:
        rows.append(("whole case, seconds", None, seconds, "-", "<= 600", seconds <= 600))
    return pd.DataFrame(rows, columns=["measure", "before", "after", "change", "target", "met"])


def plot_professions(professions: pd.DataFrame) -> Any:
    """Horizontal bars: each held-out profession's she-he margin before and after."""
    import matplotlib.pyplot as plt

    frame = professions.sort_values("before")
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(frame) + 1.2))
    y = range(len(frame))
    ax.barh([i + 0.2 for i in y], frame["before"], height=0.4, color="#bbbbbb", label="before")
    colors = ["#c0392b" if g.startswith("female") else "#2874a6" for g in frame["group"]]
    ax.barh(
        [i - 0.2 for i in y],
        frame["after"],
        height=0.4,
        color=colors,
        label="after (red: female-, blue: male-stereotyped)",
    )
    ax.set_yticks(list(y), frame["profession"])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("logit(' she') - logit(' he'), mean over held-out templates")
    ax.set_title("SmolLM2-135M: pronoun preference per held-out profession")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _markdown(result: CaseResult) -> str:
    c = result.config
    layers = "all" if c.layers is None else list(c.layers)
    lines = [
        f"# SmolLM2-135M-Instruct gender case study ({c.mode} mode)",
        "",
        f"Scored {result.n_scored} features ({', '.join(c.kinds)}; layers {layers}), "
        f"{result.n_exact} verified by exact patching. Chosen on the train split: selectivity >= "
        f"{result.chosen['threshold']}, top {int(result.chosen['k'])} -> {len(result.features)} features "
        f"({100 * result.zeroed_fraction:.4f}% of parameters edited).",
        "",
        _md(result.table),
        "",
        "Features: " + ", ".join(str(f) for f in result.features),
        "",
        "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()),
        "",
        "## Selection grid (train split)",
        "",
        _md(result.grid.drop(columns=["features"])),
        "",
        "## Per profession (eval split)",
        "",
        _md(result.professions),
        "",
    ]
    return "\n".join(lines)


def run_case(
    config: CaseConfig = FULL,
    out: str | Path = "smollm2_case",
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> CaseResult:
    """Run the case study with ``config``; write everything into ``out`` (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from examples.smollm2_case.measures import bias_measures
    from examples.smollm2_case.pronouns import explicit_gender_probes, pronoun_probes
    from examples.smollm2_case.selection import candidates, choose, selection_grid
    from icp_lens.data import imdb_texts
    from icp_lens.encoding import encode_texts, length_batches
    from icp_lens.interventions import means_over
    from icp_lens.loading import load_bridge, resolve_model_dir
    from icp_lens.probeset import ProbeSet
    from icp_lens.pruning import apply_plan, make_plan
    from icp_lens.scoring import score

    say = log or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    model_dir = resolve_model_dir(config.model)
    bridge = load_bridge(model_dir)
    train = ProbeSet(bridge, pronoun_probes("train"))
    explicit = ProbeSet(bridge, explicit_gender_probes("train"))
    lap("load")
    say(
        f"[1/5] scoring {', '.join(config.kinds)} (hybrid, verify top {config.verify_top}) on {len(train)} train probes"
    )
    table = score(
        bridge, train, method="hybrid", kinds=config.kinds, layers=config.layers, verify_top=config.verify_top,
        batch_size=config.batch_size, n_boot=config.n_boot, seed=config.seed,
        checkpoint_dir=out / "score_checkpoint", progress=progress,
    )  # fmt: skip
    table.save(out / "scores.csv")
    lap("score")
    say("[2/5] choosing features on the train split")
    select_texts = [t[: config.select_chars] for t in imdb_texts("select", config.n_select_texts, seed=config.seed)]
    reference = select_texts if config.mean_reference == "text" else [e.prompt for e in train.examples]
    pool = sorted({f for t in config.thresholds for f in candidates(table, t, max(config.ks))})
    means = None
    if config.mode == "mean":
        encoded = encode_texts(reference, model=bridge)
        means = means_over(bridge, pool, (tokens for _, tokens in length_batches(encoded, config.batch_size)))
    grid = selection_grid(
        bridge, table, train, explicit, thresholds=config.thresholds, ks=config.ks, ablation=means,
        texts=select_texts if config.max_perplexity_rise is not None else None, text_tokens=config.select_tokens,
        progress=progress,
    )  # fmt: skip
    grid.to_csv(out / "selection_grid.csv", index=False)
    row = choose(
        grid, min_explicit_accuracy=config.min_explicit_accuracy, max_perplexity_rise=config.max_perplexity_rise
    )
    features = tuple(Feature.parse(f) for f in str(row["features"]).split(";"))
    lap("select")
    say(f"[3/5] pruning {len(features)} features ({config.mode} mode), exporting and verifying")
    plan = make_plan(
        bridge, features, mode=config.mode, reference=reference,
        description=f"mean reference: {config.mean_reference}", scores="scores.csv",
        threshold=float(row["threshold"]), top_k=int(row["k"]),
    )  # fmt: skip
    pruned = apply_plan(
        bridge, plan, out / "checkpoint", overwrite=True, tolerance=config.tolerance,
        prompts=[e.prompt for e in pronoun_probes("eval")],
    )  # fmt: skip
    verification = pruned.verification.to_dict() if pruned.verification is not None else {}
    lap("prune_export_verify")
    del bridge
    say("[4/5] evaluating the original and the exported checkpoint on held-out professions and templates")
    kwargs = dict(n_imdb=config.n_imdb, imdb_tokens=config.imdb_tokens, n_wino=config.n_wino,
                  n_crows=config.n_crows, seed=config.seed)  # fmt: skip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    original = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    before, prof_before = bias_measures(original, tokenizer, **kwargs)
    del original
    edited = AutoModelForCausalLM.from_pretrained(str(out / "checkpoint"), dtype=torch.float32).eval()
    after, prof_after = bias_measures(edited, tokenizer, **kwargs)
    del edited
    lap("evaluate")
    professions = prof_before.rename(columns={"margin": "before"}).merge(
        prof_after[["profession", "margin"]].rename(columns={"margin": "after"}), on="profession"
    )
    total = time.perf_counter() - start
    seconds["total"] = total
    result = CaseResult(
        out=out, config=config, features=features,
        table=results_table(before, after, verification, config, seconds=total),
        before=before, after=after, professions=professions, grid=grid,
        chosen={k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()},
        verification=verification, zeroed_fraction=pruned.stats.zeroed_fraction,
        n_scored=len(table), n_exact=int(table.frame["exact"].sum()), seconds=seconds,
    )  # fmt: skip
    say("[5/5] writing results")
    professions.to_csv(out / "per_profession.csv", index=False)
    fig = plot_professions(professions)
    fig.savefig(out / "per_profession.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    (out / "results.json").write_text(json.dumps(jsonable(result.to_dict()), indent=2))
    (out / "results.md").write_text(_markdown(result))
    return result


def _md(frame: pd.DataFrame) -> str:
    """A markdown table (numbers to 4 significant digits; no tabulate dependency)."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])

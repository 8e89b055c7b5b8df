"""The main job, end to end, on the built-in default: ``icp-lens demo``.

1. build (or reuse) the default organism: a 2-layer GPT-2 trained on a task with a
   planted lexical shortcut (ground truth known, see ``icp_lens.organisms``);
2. score every MLP neuron and attention head with the hybrid scorer, and every
   token-embedding feature (``icp_lens.scoring.score_tokens``) exactly, on the probe split
   (its spurious and causal counterfactuals; **no group labels**);
3. select what to remove: the token-embedding features that pass the ICP rule
   (``DEFAULT_TOKEN_SELECTION``: ``S >= 10%`` of the top score, selectivity >= 0.5), in
   the mode (zero or mean row) that keeps the probe accuracy higher; units only when
   asked (``select`` or ``unit_selection``; on this organism pruning the top unit on top
   of the tokens changes nothing, and units alone leave the worst group at 0);
4. make a ``PrunePlan`` and export the edited HF checkpoint (atomic; a tied unembedding
   is untied so the model still predicts the token), then verify it against the
   hook-ablated original;
5. evaluate the original, the pruned checkpoint (loaded with ``transformers`` alone) and
   the organism's oracle (trained where the planted token is uninformative) on the
   in-distribution, balanced and no-shortcut test splits; the share of the worst-group
   gap closed is ``(after - before) / (oracle - before)``;
6. write the score tables, the plan, the checkpoint, a JSON report and a figure
   (group accuracies before/after) into ``out``.

``device`` (``icp-lens demo --device``, default the CPU) is where steps 2-5 run: the
bridge that is scored and gives the pruning's means, the export's verification and the
evaluated models. The organism itself is the CPU reference build (step 1), reused from
the cache on any device.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from icp_lens.features import Feature
from icp_lens.pruning.plan import TokenRow

__all__ = ["DemoResult", "run_demo", "default_demo_dir", "DEFAULT_SELECTION", "DEFAULT_TOKEN_SELECTION"]

#: How the demo chooses token-embedding features (``TokenScoreTable.icp_selection``):
#: spurious score at least ``min_share`` of the top token's and selectivity (spurious vs
#: causal effect) at least ``min_selectivity``.
DEFAULT_TOKEN_SELECTION: dict[str, Any] = {"min_selectivity": 0.5, "min_share": 0.1}

#: How the demo chooses units (``select_features`` arguments) when ``unit_selection`` is
#: not given: ``None``, none (see the module docstring); ``{"top_k": 1}`` was the old default.
DEFAULT_SELECTION: dict[str, Any] | None = None

SPLITS = ("test_id", "test_balanced", "test_no_shortcut")
ROWS = {
    "in-distribution accuracy": ("test_id", "accuracy"),
    "balanced accuracy": ("test_balanced", "accuracy"),
    "worst-group accuracy": ("test_balanced", "worst_group_accuracy"),
    "no-shortcut accuracy": ("test_no_shortcut", "accuracy"),
    "flip rate (balanced)": ("test_balanced", "flip_rate"),
    "ECE (balanced)": ("test_balanced", "ece"),
}


def default_demo_dir() -> Path:
    from icp_lens.organisms.build import default_cache_dir

    return default_cache_dir() / "demo"


@dataclass(frozen=True)
class DemoResult:
    """Everything the demo produced, and where it wrote it."""

    out: Path
    features: tuple[Feature, ...]
    metrics: pd.DataFrame  # rows: ROWS keys; columns: before, after, oracle, gap_closed
    group_accuracy: pd.DataFrame  # rows: groups; columns: before, after
    verification_error: float
    verification_passed: bool
    zeroed_fraction: float
    seconds: float
    paths: dict[str, Path]
    tokens: tuple[TokenRow, ...] = ()  # token-embedding features pruned
    token_mode: str | None = None  # "zero" or "mean" row, None without tokens
    oracle: dict[str, float | None] | None = None  # the oracle's ROWS metrics
    gap_closed: float | None = None  # share of the worst-group gap closed (vs the oracle)
    untied_unembedding: bool = False

    @property
    def pruned(self) -> list[str]:
        """Everything pruned, units then tokens, as text."""
        return [str(f) for f in self.features] + [str(t) for t in self.tokens]

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": {k: _num(v) for k, v in self.metrics["before"].items()},
            "after": {k: _num(v) for k, v in self.metrics["after"].items()},
            "group_accuracy_before": {k: _num(v) for k, v in self.group_accuracy["before"].items()},
            "group_accuracy_after": {k: _num(v) for k, v in self.group_accuracy["after"].items()},
            "n_pruned": len(self.pruned),
            "pruned": self.pruned,
            "pruned_units": [str(f) for f in self.features],
            "pruned_tokens": [{"token_id": t.token_id, "token": t.token} for t in self.tokens],
            "token_mode": self.token_mode,
            "untied_unembedding": self.untied_unembedding,
            "oracle": None if self.oracle is None else {k: _num(v) for k, v in self.oracle.items()},
            "gap_closed": self.gap_closed,
            "verification_error": self.verification_error,
            "verification_passed": self.verification_passed,
            "zeroed_fraction": self.zeroed_fraction,
            "seconds": round(self.seconds, 1),
            "paths": {k: str(v) for k, v in self.paths.items()},
        }


def _num(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _evaluate(model_dir: Path, organism: Any, n_boot: int, *, model: Any = None, device: Any = "cpu") -> dict[str, Any]:
    from icp_lens.evaluation import evaluate
    from icp_lens.pruning.source import load_checkpoint, load_tokenizer

    model = (model if model is not None else load_checkpoint(model_dir)).to(device)
    tokenizer = load_tokenizer(model_dir)
    return {split: evaluate(model, tokenizer, organism.probes(split), n_boot=n_boot) for split in SPLITS}


def _figure(groups: pd.DataFrame, path: Path, oracle: float | None = None) -> Path | None:
    """Group accuracy before / after pruning, the values on the bars, the oracle's worst group as a line."""
    from icp_lens.plotting import COLORS, label_bars, legend_outside, pyplot, reference_line, style

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.4))
    shown = groups.rename(index=lambda g: str(g).replace("|", "\n"))  # "pos|shortcut=neg" on two lines
    shown.plot.bar(ax=ax, rot=0, color=[COLORS["before"], COLORS["after"]], width=0.75)
    label_bars(ax)
    if oracle is not None:
        reference_line(ax, oracle, "oracle, worst group")
    style(ax, title="Group accuracy on the balanced test set, before / after pruning", ylabel="accuracy")
    ax.set_ylim(0, 1.12)
    legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(
    out: str | Path | None = None,
    *,
    select: Callable[[Any, Any, Any], Sequence[Feature]] | None = None,
    mode: str = "mean",
    n_probes: int = 256,
    n_boot: int = 100,
    progress: bool = True,
    log: Callable[[str], None] = print,
    tokens: bool = True,
    unit_selection: dict[str, Any] | None = None,
    token_selection: dict[str, Any] | None = None,
    device: Any = "cpu",
) -> DemoResult:
    """Run the whole pipeline on the default organism; see the module docstring.

    ``select(bridge, probes, table) -> features`` chooses units to prune (from the unit
    score table); ``unit_selection`` does the same with ``select_features`` arguments
    (default ``DEFAULT_SELECTION``: no units). ``mode`` is the units' prune mode.
    ``tokens=False`` skips token-embedding features (then some unit rule is needed;
    ``{"top_k": 1}`` if none is given). ``token_selection`` overrides
    ``DEFAULT_TOKEN_SELECTION``. ``device`` (``cpu``, ``auto``, ``cuda``, ...) is where the
    scoring, the pruning's reference and verification, and the evaluation run.
    """
    from icp_lens.devices import resolve_device
    from icp_lens.evaluation import gap_closed
    from icp_lens.organisms import build_organism
    from icp_lens.probes import ProbeExample
    from icp_lens.probeset import ProbeSet
    from icp_lens.pruning import apply_plan, make_plan, select_features
    from icp_lens.scoring import score, score_tokens, token_ablation_mode

    start = time.perf_counter()
    where = resolve_device(device)
    out = Path(out) if out is not None else default_demo_dir()
    out.mkdir(parents=True, exist_ok=True)
    log("1/5 organism: building or reusing the default (lexical shortcut, gpt2, seed 0; "
        "a first build trains two small models, a few minutes on two cores)")
    organism = build_organism(progress=progress)  # the CPU reference build, whatever ``device``
    bridge = organism.load_bridge(device=str(where))
    examples: list[ProbeExample] = organism.probes("probe")[:n_probes]
    probes = ProbeSet(bridge, examples)

    log(f"2/5 scoring all neurons and heads (hybrid: attribution + exact) and every token embedding (exact) on "
        f"{len(examples)} probe prompts")  # fmt: skip
    table = score(bridge, probes, method="hybrid", kinds=("neuron", "head"), progress=progress, n_boot=n_boot)
    scores_path = table.save(out / "scores.csv")
    token_table = score_tokens(bridge, probes, n_boot=n_boot, progress=progress)
    token_scores_path = token_table.save(out / "token_scores.csv")

    rule = unit_selection if unit_selection is not None else DEFAULT_SELECTION
    if not tokens and select is None and rule is None:
        rule = {"top_k": 1}
    if select is not None:
        features = list(select(bridge, probes, table))
    else:
        features = select_features(table, **rule) if rule else []
    token_rule = {**DEFAULT_TOKEN_SELECTION, **(token_selection or {})}
    token_ids = token_table.icp_selection(**token_rule) if tokens else []
    token_mode = token_ablation_mode(bridge, probes, token_ids) if token_ids else None
    if not features and not token_ids:
        raise RuntimeError("The selection rules chose nothing to prune")
    names = bridge.tokenizer.convert_ids_to_tokens(token_ids)
    log(
        f"3/5 pruning {len(features)} unit(s) ({mode} mode){': ' + ', '.join(map(str, features)) if features else ''}"
        + (f" and {len(token_ids)} token embedding(s) ({token_mode} row): {', '.join(names)}" if token_ids else "")
    )
    plan = make_plan(
        bridge, features, mode=mode, reference=probes, hf=organism.model_dir, description="organism probe split",
        tokens=token_ids, token_mode=token_mode or "zero",
        scores=str(scores_path), token_scores=str(token_scores_path),
        selection=str(rule), token_selection=str(token_rule) if tokens else None,
    )  # fmt: skip
    result = apply_plan(
        organism.model_dir, plan, out / "checkpoint", overwrite=True,
        prompts=[ex.prompt for ex in examples[:64]], reference=bridge, device=where,
    )  # fmt: skip
    verification = result.verification
    assert verification is not None

    log("4/5 evaluating the original, the pruned checkpoint (transformers only) and the oracle")
    before = _evaluate(organism.model_dir, organism, n_boot, device=where)
    after = _evaluate(result.out, organism, n_boot, device=where)
    oracle = _evaluate(organism.model_dir, organism, 0, model=organism.load_hf(oracle=True), device=where)
    metrics = pd.DataFrame(
        {
            "before": [getattr(before[s], m) for s, m in ROWS.values()],
            "after": [getattr(after[s], m) for s, m in ROWS.values()],
            "oracle": [getattr(oracle[s], m) for s, m in ROWS.values()],
        },
        index=list(ROWS),
    ).apply(pd.to_numeric, errors="coerce")
    # share of the way from before to the oracle that pruning went, per row (NaN where the oracle is no better)
    span = metrics["oracle"] - metrics["before"]
    metrics["gap_closed"] = ((metrics["after"] - metrics["before"]) / span).where(span.abs() > 1e-9)
    groups = pd.DataFrame(
        {"before": before["test_balanced"].group_accuracy, "after": after["test_balanced"].group_accuracy}
    )
    worst = [r["test_balanced"].worst_group_accuracy for r in (after, before, oracle)]
    closed = gap_closed(*worst) if None not in worst else None

    log("5/5 writing the report and the figure")
    paths = {
        "checkpoint": result.out,
        "plan": result.out / "plan.json",
        "scores": scores_path,
        "token_scores": token_scores_path,
    }
    figure = _figure(groups, out / "group_accuracy.png", oracle=worst[2])
    if figure is not None:
        paths["figure"] = figure
    demo = DemoResult(
        out=out,
        features=tuple(features),
        metrics=metrics,
        group_accuracy=groups,
        verification_error=verification.max_abs_logit_diff,
        verification_passed=verification.passed,
        zeroed_fraction=result.stats.zeroed_fraction,
        seconds=time.perf_counter() - start,
        paths=paths,
        tokens=plan.tokens,
        token_mode=token_mode,
        oracle={name: getattr(oracle[s], m) for name, (s, m) in ROWS.items()},
        gap_closed=closed,
        untied_unembedding=result.stats.untied,
    )
    paths["report"] = out / "report.json"
    (out / "report.json").write_text(json.dumps(demo.to_dict(), indent=2) + "\n")
    return demo

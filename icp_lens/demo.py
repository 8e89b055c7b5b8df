"""The main job, end to end, on the built-in default: ``icp-lens demo``.

1. build (or reuse) the default organism: a 2-layer GPT-2 trained on a task with a
   planted lexical shortcut (ground truth known, see ``icp_lens.organisms``);
2. score every MLP neuron and attention head with the hybrid scorer on the probe split
   (its spurious and causal counterfactuals; no group labels);
3. select the features to remove (``select``, see ``DEFAULT_SELECTION``);
4. make a mean-mode ``PrunePlan`` and export the edited HF checkpoint (atomic), then
   verify it against the hook-ablated original;
5. evaluate the original and the pruned checkpoint (loaded with ``transformers``
   alone) on the in-distribution, balanced and no-shortcut test splits;
6. write the score table, the plan, the checkpoint, a JSON report and a figure
   (group accuracies before/after) into ``out``.
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

__all__ = ["DemoResult", "run_demo", "default_demo_dir", "DEFAULT_SELECTION"]

#: How the demo chooses features: the hybrid score's top features among those whose
#: selectivity (spurious vs causal effect) shows they do not carry the true cue.
DEFAULT_SELECTION: dict[str, Any] = {"top_k": 1}

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
    metrics: pd.DataFrame  # rows: ROWS keys; columns: before, after
    group_accuracy: pd.DataFrame  # rows: groups; columns: before, after
    verification_error: float
    verification_passed: bool
    zeroed_fraction: float
    seconds: float
    paths: dict[str, Path]

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": {k: _num(v) for k, v in self.metrics["before"].items()},
            "after": {k: _num(v) for k, v in self.metrics["after"].items()},
            "group_accuracy_before": {k: _num(v) for k, v in self.group_accuracy["before"].items()},
            "group_accuracy_after": {k: _num(v) for k, v in self.group_accuracy["after"].items()},
            "n_pruned": len(self.features),
            "pruned": [str(f) for f in self.features],
            "verification_error": self.verification_error,
            "verification_passed": self.verification_passed,
            "zeroed_fraction": self.zeroed_fraction,
            "seconds": round(self.seconds, 1),
            "paths": {k: str(v) for k, v in self.paths.items()},
        }


def _num(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _evaluate(model_dir: Path, organism: Any, n_boot: int) -> dict[str, Any]:
    from icp_lens.evaluation import evaluate
    from icp_lens.pruning.source import load_checkpoint, load_tokenizer

    model, tokenizer = load_checkpoint(model_dir), load_tokenizer(model_dir)
    return {split: evaluate(model, tokenizer, organism.probes(split), n_boot=n_boot) for split in SPLITS}


def _figure(groups: pd.DataFrame, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the `plot` extra is not installed
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    groups.plot.bar(ax=ax, rot=0, color=["#b0b0b0", "#2b7bba"])
    ax.set_ylabel("accuracy (balanced test set)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Group accuracy before / after pruning")
    ax.legend(loc="lower right")
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
) -> DemoResult:
    """Run the whole pipeline on the default organism; see the module docstring.

    ``select(bridge, probes, table) -> features`` overrides the selection rule.
    """
    from icp_lens.organisms import build_organism
    from icp_lens.probes import ProbeExample
    from icp_lens.probeset import ProbeSet
    from icp_lens.pruning import apply_plan, make_plan, select_features
    from icp_lens.scoring import score

    start = time.perf_counter()
    out = Path(out) if out is not None else default_demo_dir()
    out.mkdir(parents=True, exist_ok=True)
    log("1/5 organism: building or reusing the default (lexical shortcut, gpt2, seed 0)")
    organism = build_organism()
    bridge = organism.load_bridge()
    examples: list[ProbeExample] = organism.probes("probe")[:n_probes]
    probes = ProbeSet(bridge, examples)

    log(f"2/5 scoring all neurons and heads on {len(examples)} probe prompts (hybrid: attribution + exact)")
    table = score(bridge, probes, method="hybrid", kinds=("neuron", "head"), progress=progress, n_boot=n_boot)
    scores_path = table.save(out / "scores.csv")

    features = (
        list(select(bridge, probes, table)) if select is not None else select_features(table, **DEFAULT_SELECTION)
    )
    if not features:
        raise RuntimeError("The selection rule chose no features")
    log(f"3/5 pruning {len(features)} feature(s) ({mode} mode): " + ", ".join(map(str, features)))
    plan = make_plan(
        bridge, features, mode=mode, reference=[ex.prompt for ex in examples], hf=organism.model_dir,
        description="organism probe split", scores=str(scores_path), selection=str(DEFAULT_SELECTION),
    )  # fmt: skip
    result = apply_plan(
        organism.model_dir, plan, out / "checkpoint", overwrite=True,
        prompts=[ex.prompt for ex in examples[:64]], reference=bridge,
    )  # fmt: skip
    verification = result.verification
    assert verification is not None

    log("4/5 evaluating the original and the pruned checkpoint (transformers only)")
    before = _evaluate(organism.model_dir, organism, n_boot)
    after = _evaluate(result.out, organism, n_boot)
    metrics = pd.DataFrame(
        {
            "before": [getattr(before[s], m) for s, m in ROWS.values()],
            "after": [getattr(after[s], m) for s, m in ROWS.values()],
        },
        index=list(ROWS),
    )
    groups = pd.DataFrame(
        {"before": before["test_balanced"].group_accuracy, "after": after["test_balanced"].group_accuracy}
    )

    log("5/5 writing the report and the figure")
    paths = {"checkpoint": result.out, "plan": result.out / "plan.json", "scores": scores_path}
    figure = _figure(groups, out / "group_accuracy.png")
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
    )
    paths["report"] = out / "report.json"
    (out / "report.json").write_text(json.dumps(demo.to_dict(), indent=2) + "\n")
    return demo

"""Cost of an invariance training step against a plain fine-tuning (ERM) step, in one run.

Target (issue): an invariance step at most 1.8x an ERM step on the same batch. Measured
here, interleaved in one process on the same batches (each variant steps through the
same seeded batch sequence, all with the same optimiser, schedule and clipping):

- ``erm``: the task loss alone;
- ``invariance``: task + lam * KL(clean, intervened), today's step: the intervened rows
  either branch off the clean rows at the first edited layer and skip the attention their
  edits overwrite (:mod:`icp_lens.training.branch`), or, where the counterfactual shares
  the prompt's first ``p`` tokens (lexical: the planted token is the last word), run
  positions ``p..`` only on the clean keys and values, or the last position alone where
  the edits replace every head of every layer whose keys and values they could change
  (tag: every head of both layers flagged), whichever computes less; only the last
  position (all the losses read) is unembedded;
- ``invariance_half``: the pair terms on half of each batch (``pair_fraction=0.5``), a
  cheaper objective;
- ``... (old)``: the same steps as before this change (``BatchLoss.branch = False``:
  clean and intervened rows stacked from the embeddings; every position unembedded),
  with their ratio to the old ERM step.

A step is ``Trainer.train_step``: forward, backward, clipping, AdamW, schedule.
Features: the organism's top ``--top-k`` scored features (hybrid scorer, cached as by
``training_table.py``), resampled from the spurious counterfactual. Printed per variant:
the median seconds per step (wall clock and this thread's CPU time; the first
``--warmup`` steps, which include the branched pass's one-time check against the
reference, are excluded) and the ratio to ERM. On a shared machine the CPU-time column is
the steadier one: waiting for a core is not counted, cache contention still is.

``--model DIR --features ...`` times the same steps on any checkpoint (e.g. SmolLM2-135M)
with synthetic sentiment pairs (the reviewer's name is the spurious attribute), to see
the cost where the edited features sit deeper in the network.

    python benchmarks/bench_training_step.py [--variant lexical] [--seed 0] [--steps 10] [--repeats 5]
        [--warmup 3] [--top-k 8] [--threads 1] [--json FILE] [--model DIR --features LIST]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: ``old``: the previous step (stacked pass, every position unembedded); the others are today's default
#: (branched invariance rows, only the last position unembedded). Ratios are to the ERM step of the same kind.
VARIANTS: dict[str, dict[str, Any]] = {
    "erm": {"config": {"objective": "erm"}},
    "invariance": {"config": {"objective": "invariance"}},
    "invariance_half": {"config": {"objective": "invariance", "pair_fraction": 0.5}},
    "erm (old)": {"config": {"objective": "erm"}, "old": True},
    "invariance (old)": {"config": {"objective": "invariance"}, "old": True},
    "invariance_half (old)": {"config": {"objective": "invariance", "pair_fraction": 0.5}, "old": True},
}


def synthetic_pairs(tokenizer: Any, n: int, seed: int = 0) -> list:
    """``n`` sentiment examples for a real tokenizer, the reviewer's name the spurious attribute."""
    import random

    from icp_lens.probes import ProbeExample

    rng = random.Random(seed)
    names = [" Alice", " Bob", " Carol", " David"]
    good, bad = [" great", " superb", " lovely", " brilliant"], [" awful", " dull", " boring", " terrible"]
    one = [w for w in good + bad + names if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    good, bad, names = [w for w in good if w in one], [w for w in bad if w in one], [w for w in names if w in one]
    out = []
    for _ in range(n):
        pos = rng.random() < 0.5
        name, other = rng.sample(names, 2)
        adj = rng.choice(good if pos else bad)
        text = "Review by{}: the film was{}. Sentiment:"
        out.append(ProbeExample(prompt=text.format(name, adj), answer=" positive" if pos else " negative",
                                alternatives=(" negative" if pos else " positive",),
                                spurious_counterfactual=text.format(other, adj)))  # fmt: skip
    return out


def top_features(organism: Any, top_k: int) -> list:
    """The organism's top scored features (the score table cached by ``training_table.py``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from training_table import score_table

    from icp_lens.organisms import default_cache_dir
    from icp_lens.pruning import select_features

    cache = default_cache_dir().parent / "training_table"
    cache.mkdir(parents=True, exist_ok=True)
    return select_features(score_table(organism, cache), top_k=top_k)


def measure(
    model_dir: Any,
    train: list,
    features: list,
    *,
    variants: dict[str, dict[str, Any]] = VARIANTS,
    steps: int = 10,
    repeats: int = 5,
    warmup: int = 3,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """Median wall / CPU seconds per training step of each variant, interleaved, on the same batches.

    Returns ``variant -> {"wall_s", "cpu_s", "wall_over_erm", "cpu_over_erm"}`` (ratios
    against the ERM variant of the same kind: ``"erm"``, or ``"erm (old)"`` for the old ones).
    """
    from icp_lens.training import TrainConfig, Trainer

    total = steps * repeats + warmup
    runs = {}
    for name, spec in variants.items():
        cfg = TrainConfig(batch_size=batch_size, max_steps=total, progress=False, **spec["config"])
        feats = features if cfg.objective != "erm" else ()
        trainer = Trainer(model_dir, train, cfg, features=feats)
        if spec.get("old"):
            trainer.loss.branch = False
            trainer.loss.forward.last_only = False
        opt, sched = trainer._optimizer(total)
        per_epoch = trainer.train_data.n_batches(batch_size)
        runs[name] = {"trainer": trainer, "opt": opt, "sched": sched, "per_epoch": per_epoch, "wall": [], "cpu": []}

    def run_steps(name: str, start: int, count: int, record: bool) -> None:
        r = runs[name]
        trainer = r["trainer"]
        trainer.model.train()
        for step in range(start, start + count):
            epoch, i = divmod(step, r["per_epoch"])
            if r.get("epoch", (None,))[0] != epoch:
                r["epoch"] = (epoch, trainer.train_data.epoch(epoch, batch_size, seed=trainer.config.seed))
            batch = r["epoch"][1][i]
            pairs = trainer._pair_batch(step) if trainer._pairs_always or batch.spurious is None else None
            wall, cpu = time.perf_counter(), time.thread_time()
            terms, _ = trainer.train_step(step, batch, pairs, r["opt"], r["sched"])
            float(terms["loss"].detach())
            if record:
                r["wall"].append(time.perf_counter() - wall)
                r["cpu"].append(time.thread_time() - cpu)

    for name in variants:
        run_steps(name, 0, warmup, record=False)
    for rep in range(repeats):
        for name in variants:
            run_steps(name, warmup + rep * steps, steps, record=True)
    out: dict[str, dict[str, float]] = {}
    for name, r in runs.items():
        out[name] = {"wall_s": statistics.median(r["wall"]), "cpu_s": statistics.median(r["cpu"])}
    for name, spec in variants.items():
        base = "erm (old)" if spec.get("old") and "erm (old)" in out else "erm"
        out[name]["wall_over_erm"] = out[name]["wall_s"] / out[base]["wall_s"]
        out[name]["cpu_over_erm"] = out[name]["cpu_s"] / out[base]["cpu_s"]
        loss = runs[name]["trainer"].loss
        if loss.features:  # the branched pass never switched itself off
            assert loss.branch == (not spec.get("old")), f"{name}: the branched pass switched itself off"
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| step | wall s/step | wall / ERM | CPU s/step | CPU / ERM |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['wall_s']:.4f} | {r['wall_over_erm']:.2f} | {r['cpu_s']:.4f} | "
                     f"{r['cpu_over_erm']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="lexical")
    parser.add_argument("--arch", default="gpt2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--model", default=None, help="an HF checkpoint directory instead of the organism (synthetic sentiment pairs)"
    )
    parser.add_argument(
        "--features",
        default=None,
        help="comma-separated features (e.g. 'head L12.0,neuron L15.3'); default: the top scored",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from icp_lens import Feature

    total = args.steps * args.repeats + args.warmup
    if args.model is not None:
        from icp_lens.pruning.source import load_tokenizer

        if args.features is None:
            parser.error("--model needs --features")
        model_dir, name = args.model, Path(args.model).name
        train = synthetic_pairs(load_tokenizer(args.model), args.batch_size * total, seed=args.seed)
    else:
        from icp_lens.organisms import build_organism

        organism = build_organism(variant=args.variant, arch=args.arch, seed=args.seed)
        model_dir, name = organism.model_dir, organism.spec.name
        train = organism.probes("train")[: args.batch_size * total]
    if args.features is not None:
        features = [Feature.parse(f.strip()) for f in args.features.split(",") if f.strip()]
    else:
        features = top_features(organism, args.top_k)
    results = measure(model_dir, train, features, steps=args.steps, repeats=args.repeats,
                      warmup=args.warmup, batch_size=args.batch_size)  # fmt: skip
    print(f"# Training step cost: {name}, batch {args.batch_size}, features {[str(f) for f in features]}, "
          f"{args.repeats} x {args.steps} steps per variant, {args.threads} thread(s)\n")  # fmt: skip
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"model": name, "features": [str(f) for f in features],
                                         "results": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()

"""Attribution patching: cost against a plain forward + backward, and agreement with exact patching.

On an organism (default: the default organism, ``lexical`` / ``gpt2`` / seed 0), over its
``test_balanced`` split:

1. **Cost.** A plain forward + backward (``metric.sum().backward()``, parameter gradients
   as in training) over the whole probe set is the baseline, measured in this run; AtP
   over all MLP neurons and attention heads is printed as a ratio to it (target: <= 3x).
   IG is printed too (one path per hook, and one path per head over the heads alone).
2. **Agreement.** Each feature's score is its mean ``|dP|`` over the examples. Exact scores
   come from ``icp_lens.scoring.exact.exact_effects`` when that module exists, else from
   batch-packed single-feature patching (``icp_lens.edits.run_packed``). Printed: Spearman
   rank correlation over the exact top 200 (target >= 0.9) and over all features, whether
   the exact top 20 is inside the attribution top 100 (target: yes), and the same per
   (kind, layer) group to show where AtP fails.
3. **AtP*** (Kramár et al. 2024; ``icp_lens.scoring.atp_star``). ``--qk-fix`` adds every
   attention query and key (kinds ``query``, ``key``) to the features and scores them with
   the QK fix (the attention pattern recomputed exactly) next to plain AtP; ``--grad-drop``
   adds GradDrop (a magnitude: its score is the mean over examples of
   ``1/(L-1) sum_l |AtP_{-l}|``); both together add AtP* (QK fix + GradDrop). Each is timed
   against the same baseline and compared with exact patching of the same features.
   ``--no-ig`` skips the IG runs.

    python benchmarks/bench_attribution.py [--variant lexical] [--arch gpt2] [--examples 2000]
        [--intervention resample] [--repeats 5] [--threads N] [--no-exact]
        [--qk-fix] [--grad-drop] [--no-ig]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from icp_lens import Edit, Zero, enumerate_features, resample_from, run_packed
from icp_lens.metrics import get_metric
from icp_lens.organisms import build_organism
from icp_lens.probes import read_probes
from icp_lens.probeset import ProbeSet
from icp_lens.scoring.attribution import attribution_effects
from icp_lens.scoring.effects import InterventionSpec, probe_means


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = a.argsort().argsort().astype(float)
    rb = b.argsort().argsort().astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def plain_forward_backward(model, probes: ProbeSet, metric, batch_size: int) -> None:
    for batch in probes.batches(batch_size):
        logits = model(batch.tokens)
        metric(logits[:, -1], batch, logits[:, -1].detach()).sum().backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def exact_scores(model, probes: ProbeSet, features, spec: InterventionSpec, metric, batch_size: int) -> np.ndarray:
    """Mean |dP| per feature from single-feature patching (exact_effects if available)."""
    try:
        from icp_lens.scoring.exact import exact_effects

        effects = exact_effects(model, probes, features, spec, metric=metric, batch_size=batch_size, progress=False)
        print("  (exact scores from icp_lens.scoring.exact.exact_effects)")
        return effects.values.abs().nanmean(1).numpy()
    except ImportError:
        pass
    print("  (exact scores from run_packed single-feature patching)")
    fn = get_metric(metric)
    means = probe_means(model, probes, features, batch_size=batch_size) if spec.kind == "mean" else None
    total = torch.zeros(len(features), dtype=torch.float64)
    count = 0
    for batch in probes.batches(batch_size):
        clean_logits = model(batch.tokens)[:, -1]
        clean = fn(clean_logits, batch, clean_logits)
        if spec.kind == "resample":
            source = resample_from(model, features, batch.spurious)
            groups = [Edit(f, source[f]) for f in features]
        elif spec.kind == "zero":
            groups = [Edit(f, Zero()) for f in features]
        elif spec.kind == "mean":
            groups = [Edit(f, means[f]) for f in features]
        else:
            raise ValueError(f"benchmark supports resample, zero, mean; got {spec.label}")
        last = run_packed(model, batch.tokens, groups, max_rows=4096, reduce=lambda lg: lg[:, -1])
        for k in range(len(features)):
            total[k] += (fn(last[k], batch, clean_logits) - clean).abs().sum().double()
        count += batch.size
    return (total / count).numpy()


def agreement(name: str, atp: np.ndarray, exact: np.ndarray, labels: list[str]) -> None:
    order = np.argsort(-exact)
    top200 = order[:200]
    rho200 = spearman(atp[top200], exact[top200])
    rho20 = spearman(atp[order[:20]], exact[order[:20]])
    rho_all = spearman(atp, exact)
    atp_top100 = set(np.argsort(-atp)[:100].tolist())
    top20 = order[:20].tolist()
    inside = sum(i in atp_top100 for i in top20)
    print(
        f"{name:>11}: Spearman top-200 (by exact) {rho200:.3f}   top-20 {rho20:.3f}   all {rho_all:.3f}   "
        f"exact top-20 in attribution top-100: {inside}/20"
    )
    missing = [labels[i] for i in top20 if i not in atp_top100]
    if missing:
        print(f"       missing from the attribution top 100: {missing}")


def per_group(atp: np.ndarray, exact: np.ndarray, features) -> None:
    header = f"{'group':<10} {'n':>4} {'spearman':>9} {'sum est':>9} {'sum exact':>10} {'ratio':>6}"
    print(f"  {header} worst feature (estimate vs exact)")
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(features):
        groups.setdefault(f"{f.kind} L{f.layer}", []).append(i)
    for g, idx in groups.items():
        a, e = atp[idx], exact[idx]
        worst = int(np.argmax(np.abs(a - e)))
        rho = spearman(a, e) if len(idx) > 2 else float("nan")
        ratio = a.sum() / e.sum() if e.sum() > 0 else float("nan")
        f = features[idx[worst]]
        print(
            f"  {g:<10} {len(idx):>4} {rho:>9.3f} {a.sum():>9.3f} {e.sum():>10.3f} {ratio:>6.2f} "
            f"{f}: {a[worst]:.3f} vs {e[worst]:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="lexical")
    parser.add_argument("--arch", default="gpt2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=2000, help="first N test_balanced examples")
    parser.add_argument("--intervention", default="resample")
    parser.add_argument("--metric", default="logit_diff")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats, interleaved (best of)")
    parser.add_argument("--no-exact", action="store_true", help="timing only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--qk-fix", action="store_true", help="add queries and keys; time and score AtP's QK fix")
    parser.add_argument("--grad-drop", action="store_true", help="time and score GradDrop (AtP* with --qk-fix)")
    parser.add_argument("--no-ig", action="store_true", help="skip the integrated-gradients runs")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    organism = build_organism(variant=args.variant, arch=args.arch, seed=args.seed)
    model = organism.load_bridge()
    examples = read_probes(organism.data_path("test_balanced"), tokenizer=model.tokenizer)[: args.examples]
    probes = ProbeSet(model, examples)
    kinds = ["neuron", "head"] + (["query", "key"] if args.qk_fix else [])
    features = [f for kind in kinds for f in enumerate_features(model, kind)]
    labels = [str(f) for f in features]
    spec = InterventionSpec.parse(args.intervention)
    kw = dict(metric=args.metric, batch_size=args.batch_size, progress=False)
    print(
        f"organism {args.variant}/{args.arch}/seed{args.seed}: {len(probes)} test_balanced examples, "
        f"{len(features)} features (all of {', '.join(kinds)}), intervention {spec.label}, metric {args.metric}"
    )

    heads = [f for f in features if f.kind == "head"]
    ig_heads_kw = dict(method="ig", ig_steps=args.ig_steps, ig_paths="feature", **kw)
    runs = {
        "plain forward + backward (baseline)": lambda: plain_forward_backward(
            model, probes, get_metric(args.metric), args.batch_size
        ),
        f"AtP, all {' + '.join(kinds)}": lambda: attribution_effects(model, probes, features, spec, method="atp", **kw),
    }
    if not args.no_ig:
        runs[f"IG, {args.ig_steps} steps, one path per hook"] = lambda: attribution_effects(
            model, probes, features, spec, method="ig", ig_steps=args.ig_steps, **kw
        )
        runs[f"IG, {args.ig_steps} steps, one path per head"] = lambda: attribution_effects(
            model, probes, heads, spec, **ig_heads_kw
        )
    star = {}  # estimator label -> run name
    if args.qk_fix:
        star["AtP+QK"] = "AtP + QK fix"
        runs["AtP + QK fix"] = lambda: attribution_effects(model, probes, features, spec, qk_fix=True, **kw)
    if args.grad_drop:
        star["GradDrop"] = "GradDrop"
        runs["GradDrop"] = lambda: attribution_effects(model, probes, features, spec, grad_drop=True, **kw)
    if args.qk_fix and args.grad_drop:
        star["AtP*"] = "AtP* (QK fix + GradDrop)"
        runs["AtP* (QK fix + GradDrop)"] = lambda: attribution_effects(
            model, probes, features, spec, qk_fix=True, grad_drop=True, **kw
        )
    # Interleaved repeats, best of each: on a shared machine the load changes during a run,
    # and interleaving exposes every method to the same conditions.
    runs["plain forward + backward (baseline)"]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for _ in range(max(1, args.repeats)):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    base = min(times["plain forward + backward (baseline)"])
    for name, ts in times.items():
        target = "  (target <= 3)" if name.startswith("AtP,") else ""
        print(f"{name:<38} {min(ts):8.3f} s   ratio {min(ts) / base:6.2f}{target}")
    if args.no_exact:
        return

    names = list(runs)
    atp = results[names[1]]
    start = time.perf_counter()
    exact = exact_scores(model, probes, features, spec, args.metric, args.batch_size)
    print(f"exact patching, one feature at a time (packed): {time.perf_counter() - start:7.3f} s")
    atp_s = atp.values.abs().nanmean(1).numpy()
    agreement("AtP", atp_s, exact, labels)
    groups = [("AtP (score = mean |dP|)", atp_s)]
    if not args.no_ig:
        ig, ig_heads = results[names[2]], results[names[3]]
        ig_s = ig.values.abs().nanmean(1).numpy()
        mixed = atp_s.copy()  # AtP for neurons, per-head IG for heads
        mixed[[i for i, f in enumerate(features) if f.kind == "head"]] = ig_heads.values.abs().nanmean(1).numpy()
        agreement("IG/hook", ig_s, exact, labels)
        agreement("AtP+IG/head", mixed, exact, labels)
        groups += [("IG with one path per hook", ig_s), ("AtP for neurons + IG with one path per head", mixed)]
    for label, name in star.items():  # GradDrop's values are magnitudes already: the same mean gives its score
        est = results[name].values.abs().nanmean(1).numpy()
        agreement(label, est, exact, labels)
        groups.append((f"{name} ({results[name].estimator})", est))
    for label, est in groups:
        print(f"per kind and layer, {label}:")
        per_group(est, exact, features)


if __name__ == "__main__":
    main()

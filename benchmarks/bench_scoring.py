"""Scoring speed against TransformerLens's own tools, measured in the same run.

Section ``exact``: ``icp_lens.scoring.exact.exact_effects`` against the loop a TransformerLens
user writes with ``transformer_lens.patching.generic_activation_patch``: one patched forward
pass per feature (an ``index_df`` over (layer, neuron), a patch setter that copies one
neuron from the counterfactual run's cache), on the same features, probe examples and
model, resampling from the spurious counterfactual. Printed: time per feature of each, the
ratio (target: exact_effects >= 5x faster per feature), and the largest difference between
their ``dP`` values (target: equal to float round-off).

Section ``attribution``: reserved for the attribution scorer (see ``bench_attribution``).

Default: the default organism (``lexical`` / ``gpt2`` / seed 0), every MLP neuron, 64
``test_balanced`` examples (all of which have a spurious counterfactual). ``--model`` and
``--probes`` run the same measurement on any checkpoint and probe file (e.g. SmolLM2);
``bench_exact`` takes any TransformerBridge / HookedTransformer.

Both sides run with one torch thread by default: on a shared 2-core machine, two threads
make the many small forward passes of the baseline erratic (up to 25x slower in one
repeat), which flatters the packed scorer; ``--threads 0`` keeps torch's default.

    python benchmarks/bench_scoring.py [--section exact] [--examples 64] [--features 0] [--repeats 2]
        [--model HF_DIR_OR_NAME --probes FILE.jsonl] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

os.environ.setdefault("TQDM_DISABLE", "1")  # generic_activation_patch's progress bar (read when tqdm loads)

import torch  # noqa: E402

from icp_lens import Feature, enumerate_features  # noqa: E402
from icp_lens.metrics import logit_diff  # noqa: E402
from icp_lens.probeset import ProbeSet  # noqa: E402
from icp_lens.scoring.exact import exact_effects  # noqa: E402


def tl_patching_loop(model, probes: ProbeSet, features: Sequence[Feature]) -> torch.Tensor:
    """dP [n_features, n_examples] with ``generic_activation_patch``, one forward pass per neuron."""
    import pandas as pd
    from transformer_lens.patching import generic_activation_patch

    if any(f.kind != "neuron" for f in features):
        raise ValueError("the TransformerLens baseline here patches MLP neurons (hook_post)")
    if not probes.has_spurious:
        raise ValueError("the baseline patches from the spurious counterfactual: every probe example needs one")
    index_df = pd.DataFrame({"layer": [f.layer for f in features], "neuron": [f.index for f in features]})

    def patch_neuron(corrupted, index, clean):  # index = [layer, neuron]
        corrupted[:, :, index[1]] = clean[:, :, index[1]]
        return corrupted

    out = torch.full((len(features), len(probes)), float("nan"))
    for batch in probes.batches(len(probes)):
        # TransformerLens's vocabulary: the run we patch into is the "corrupted" run, the
        # source of the patched values the "clean cache": here prompt and spurious counterfactual.
        _, source_cache = model.run_with_cache(batch.spurious, names_filter=lambda name: name.endswith("mlp.hook_post"))
        with torch.no_grad():
            base = logit_diff(model(batch.tokens)[:, -1], batch)
        result = generic_activation_patch(
            model,
            batch.tokens,
            source_cache,
            lambda logits, batch=batch: logit_diff(logits[:, -1], batch),
            patch_neuron,
            "post",
            index_df=index_df,
            reduce="none",
        )
        out[:, batch.index] = (result.values - base).float().cpu()
    return out


def bench_exact(
    model,
    probes: ProbeSet,
    features: Sequence[Feature],
    *,
    batch_size: int = 32,
    features_per_pass: int = 64,
    repeats: int = 2,
) -> dict[str, float]:
    """Time ``exact_effects`` and the TransformerLens loop on the same work; best of ``repeats``."""
    t_tl = t_exact = float("inf")
    for _ in range(repeats):  # interleaved, so both see the same machine load
        start = time.perf_counter()
        baseline = tl_patching_loop(model, probes, features)
        t_tl = min(t_tl, time.perf_counter() - start)
        start = time.perf_counter()
        effects = exact_effects(
            model, probes, features, "resample", batch_size=batch_size, features_per_pass=features_per_pass,
            progress=False,
        )  # fmt: skip
        t_exact = min(t_exact, time.perf_counter() - start)
    n = len(features)
    diff = (effects.values - baseline).abs().max().item()
    print(f"exact patching: {n} features x {len(probes)} probe examples, resample from the spurious counterfactual")
    print(f"  TransformerLens generic_activation_patch loop (baseline): {1e3 * t_tl / n:8.2f} ms/feature   ratio 1.00")
    print(
        f"  icp_lens exact_effects ({features_per_pass} features x {batch_size} examples per pass): "
        f"{1e3 * t_exact / n:8.2f} ms/feature   ratio {t_tl / t_exact:.2f}x faster"
    )
    print(f"  max |exact_effects - baseline| = {diff:.2e}")
    return {"ratio": t_tl / t_exact, "max_abs_diff": diff}


def bench_attribution(*args, **kwargs) -> None:
    """Reserved: the attribution scorer's section (added with ``icp_lens.scoring.attribution``)."""
    # ---- attribution section goes here -------------------------------------------------------
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["exact", "attribution", "all"], default="exact")
    parser.add_argument("--model", help="an HF checkpoint directory or hub name instead of an organism")
    parser.add_argument("--probes", help="probe JSONL for --model (default: the organism's test_balanced)")
    parser.add_argument("--variant", default="lexical")
    parser.add_argument("--arch", default="gpt2")
    parser.add_argument("--examples", type=int, default=64, help="first N probe examples")
    parser.add_argument("--features", type=int, default=0, help="first N MLP neurons (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features-per-pass", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for both sides (0: torch's default); one thread keeps timings stable on a shared machine",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        from icp_lens import boot_bridge
        from icp_lens.probes import read_probes

        if not args.probes:
            parser.error("--model needs --probes")
        model = boot_bridge(args.model)
        probes = ProbeSet(model, read_probes(args.probes, tokenizer=model.tokenizer)[: args.examples])
        name = args.model
    else:
        from icp_lens.organisms import build_organism

        organism = build_organism(variant=args.variant, arch=args.arch, seed=0)
        model = organism.load_bridge()
        probes = ProbeSet(model, organism.probes("test_balanced")[: args.examples])
        name = f"organism {organism.spec.name} (test_balanced)"
    print(f"{name}: {len(probes)} probe examples, {torch.get_num_threads()} torch threads")
    if args.section in ("exact", "all"):
        features = enumerate_features(model, "neuron")
        features = features[: args.features] if args.features else features
        bench_exact(
            model, probes, features, batch_size=args.batch_size, features_per_pass=args.features_per_pass,
            repeats=args.repeats,
        )  # fmt: skip
    if args.section in ("attribution", "all"):
        bench_attribution(model, probes)


if __name__ == "__main__":
    main()

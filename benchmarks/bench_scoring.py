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
``--probes`` run the same measurement on any checkpoint (a directory, a hub name or an
alias of ``icp_lens.loading``) and probe file; ``--model smollm2`` defaults to the
profession -> pronoun probes (``examples.smollm2_case.pronouns``, ``train``), e.g.

    python benchmarks/bench_scoring.py --model smollm2 --features 128 --examples 32

``--features N`` takes N neurons evenly spaced over all of them, so every layer is
represented as in a run over all neurons (``--first`` takes the first N instead: all in
layer 0 on a large model, where no pass can skip a block). ``--ablate`` also times
``exact_effects`` with block skipping turned off (every patched pass runs every block, and
no attention output is reused; the other shortcuts stay), in the same run. ``--peers`` (Llama-family
models, e.g. ``--model smollm2``) also times the idiom an expert writes with plain PyTorch
forward hooks on the HF model (``hook_idiom``: neurons batched by tiling the prompts,
layers before the patched one skipped) and nnsight 0.8's batched invokes
(``nnsight_idiom``; ``pip install -e ".[bench]"``, skipped with a message without it), in the same run.
pyvene is not among them (not tried against transformers 5). ``bench_exact`` takes any
TransformerBridge / HookedTransformer.

Both sides run with one torch thread by default: on a shared 2-core machine, two threads
make the many small forward passes of the baseline erratic (up to 25x slower in one
repeat), which flatters the packed scorer; ``--threads 0`` keeps torch's default.

    python benchmarks/bench_scoring.py [--section exact] [--examples 64] [--features 0] [--first] [--repeats 2]
        [--model HF_DIR_OR_NAME [--probes FILE.jsonl]] [--ablate] [--threads 1] [--float64 N]

``--float64 N`` repeats the comparison on N of the features with the model in float64 and
prints the float32 rounding floor (how far the baseline's own float32 values are from its
float64 values): on a 30-layer model the two sides' float32 difference is round-off when it
is at or below that floor, and the float64 difference shows the results are equal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings
from collections.abc import Iterator, Sequence

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


def hook_idiom(model, probes: ProbeSet, features: Sequence[Feature], *, per_pass: int = 64) -> torch.Tensor:
    """dP [n_features, n_examples] the way an expert writes it with plain PyTorch forward hooks.

    On the Hugging Face model under the bridge (Llama family: ``model.layers[i].mlp.down_proj``,
    whose input is TransformerLens's ``mlp.hook_post``): one run of the spurious
    counterfactuals caches every layer's MLP activation; one clean run caches the residual
    stream entering every layer (``output_hidden_states``). Then, per layer and per group of
    up to ``per_pass`` neurons, the prompts are tiled once per neuron, a forward pre-hook on
    that layer's ``down_proj`` writes copy ``j``'s neuron from the counterfactual cache, and
    only the layers from the patched one onwards run (rotary embeddings recomputed, causal
    attention without a mask, as the model's own forward does for unpadded input).
    """
    from dataclasses import replace
    from functools import partial

    hf = getattr(model, "original_model", None)
    body = getattr(hf, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body.layers[0].mlp, "down_proj"):
        raise ValueError("the hook idiom here is written for Llama-family models (model.layers[i].mlp.down_proj)")
    if any(f.kind != "neuron" for f in features):
        raise ValueError("the hook idiom here patches MLP neurons")
    by_layer: dict[int, list[tuple[int, Feature]]] = {}
    for row, f in enumerate(features):
        by_layer.setdefault(f.layer, []).append((row, f))
    out = torch.full((len(features), len(probes)), float("nan"))
    with torch.no_grad():
        for batch in probes.batches(len(probes)):
            if batch.spurious is None or batch.spurious.shape != batch.tokens.shape:
                raise ValueError("the hook idiom patches position by position: counterfactuals of the prompts' length")
            source: dict[int, torch.Tensor] = {}

            def keep(_m, args, i, source=source):
                source[i] = args[0].detach()

            handles = [body.layers[i].mlp.down_proj.register_forward_pre_hook(partial(keep, i=i)) for i in by_layer]
            try:
                hf(input_ids=batch.spurious)
            finally:
                for h in handles:
                    h.remove()
            clean = hf(input_ids=batch.tokens, output_hidden_states=True)
            base = logit_diff(clean.logits[:, -1], batch)
            n, length = batch.tokens.shape
            for layer, members in sorted(by_layer.items()):
                for start in range(0, len(members), per_pass):
                    group = members[start : start + per_pass]
                    k = len(group)
                    units = torch.tensor([f.index for _, f in group])
                    copy = torch.arange(k).repeat_interleave(n)  # row r of the tiled batch is copy r // n

                    def patch(_m, args, units=units, copy=copy, layer=layer, source=source):
                        x = args[0].clone()
                        rows = torch.arange(x.shape[0])
                        x[rows, :, units[copy]] = source[layer].repeat(len(units), 1, 1)[rows, :, units[copy]]
                        return (x,)

                    hidden = clean.hidden_states[layer].repeat(k, 1, 1)
                    positions = torch.arange(length).unsqueeze(0).expand(hidden.shape[0], -1)
                    rotary = body.rotary_emb(hidden, positions)
                    handle = body.layers[layer].mlp.down_proj.register_forward_pre_hook(patch)
                    try:
                        for block in body.layers[layer:]:
                            hidden = block(hidden, position_embeddings=rotary, position_ids=positions)
                            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                    finally:
                        handle.remove()
                    logits = hf.lm_head(body.norm(hidden[:, -1]))
                    tiled = replace(batch, answer=batch.answer.repeat(k), alternatives=batch.alternatives.repeat(k, 1))
                    values = (logit_diff(logits, tiled) - base.repeat(k)).view(k, n)
                    for j, (row, _) in enumerate(group):
                        out[row, batch.index] = values[j].float().cpu()
    return out


def nnsight_idiom(model, probes: ProbeSet, features: Sequence[Feature], *, per_pass: int = 64) -> torch.Tensor:
    """dP [n_features, n_examples] with nnsight 0.8's batched invokes (Llama family).

    The HF model under the bridge wrapped in ``nnsight.LanguageModel``: one trace of the
    spurious counterfactuals saves every needed layer's ``down_proj`` input; then one trace
    per group of ``per_pass`` neurons holds one ``tracer.invoke`` of the prompts per neuron,
    each writing its neuron from the saved counterfactual activations (nnsight batches
    the invokes into one forward pass). Every pass runs every layer.
    """
    from nnsight import LanguageModel

    hf = getattr(model, "original_model", None)
    if getattr(hf, "model", None) is None or not hasattr(hf.model.layers[0].mlp, "down_proj"):
        raise ValueError("the nnsight idiom here is written for Llama-family models (model.layers[i].mlp.down_proj)")
    if any(f.kind != "neuron" for f in features):
        raise ValueError("the nnsight idiom here patches MLP neurons")
    # the bridge replaced the attention modules' forward before nnsight wrapped them; nnsight
    # warns that it cannot intervene there (this idiom only touches down_proj)
    warnings.filterwarnings("ignore", message=".*was replaced after nnsight wrapped this module.*")
    lm = LanguageModel(hf, tokenizer=model.tokenizer)
    layers = sorted({f.layer for f in features})
    out = torch.full((len(features), len(probes)), float("nan"))
    with torch.no_grad():
        for batch in probes.batches(len(probes)):
            if batch.spurious is None or batch.spurious.shape != batch.tokens.shape:
                raise ValueError(
                    "the nnsight idiom patches position by position: counterfactuals of the prompts' length"
                )
            source: dict[int, torch.Tensor] = {}  # filled in the trace (its assignments do not escape)
            with lm.trace({"input_ids": batch.spurious}):
                for layer in layers:
                    source[layer] = lm.model.layers[layer].mlp.down_proj.input.save()
            with lm.trace({"input_ids": batch.tokens}):
                base_logits = lm.lm_head.output[:, -1].save()
            base = logit_diff(base_logits, batch)
            for start in range(0, len(features), per_pass):
                group = list(enumerate(features))[start : start + per_pass]
                saved: list[torch.Tensor] = []
                with lm.trace() as tracer:
                    for _, f in group:
                        with tracer.invoke({"input_ids": batch.tokens}):
                            act = lm.model.layers[f.layer].mlp.down_proj.input
                            act[:, :, f.index] = source[f.layer][:, :, f.index]
                            saved.append(lm.lm_head.output[:, -1].save())
                for (row, _), logits in zip(group, saved, strict=True):
                    out[row, batch.index] = (logit_diff(logits, batch) - base).float().cpu()
    return out


def spread(features: Sequence[Feature], n: int) -> list[Feature]:
    """``n`` of ``features`` evenly spaced over the list (so over the layers, for ``enumerate_features``)."""
    if not 0 < n < len(features):
        return list(features)
    return [features[i * len(features) // n] for i in range(n)]


@contextlib.contextmanager
def no_block_skipping() -> Iterator[None]:
    """``exact_effects`` as if the model could not skip blocks: every patched pass runs every block."""
    from icp_lens.scoring import exact

    runner_init = exact._Runner.__init__

    def init(self, model) -> None:
        runner_init(self, model)
        self.on["prefix"] = self.on["attn"] = False  # HookedTransformer's start_at_layer too

    exact._Runner.__init__ = init
    try:
        yield
    finally:
        exact._Runner.__init__ = runner_init


def bench_exact(
    model,
    probes: ProbeSet,
    features: Sequence[Feature],
    *,
    batch_size: int = 32,
    features_per_pass: int = 64,
    repeats: int = 2,
    ablate: bool = False,
    peers: bool = False,
) -> dict[str, float]:
    """Time ``exact_effects`` and the TransformerLens loop on the same work; best of ``repeats``.

    ``ablate``: also time ``exact_effects`` without block skipping (``no_block_skipping``).
    ``peers``: also time the expert's plain-PyTorch hook idiom (``hook_idiom``, Llama family).
    """
    times = {
        "tl": float("inf"),
        "exact": float("inf"),
        "no_skip": float("inf"),
        "hooks": float("inf"),
        "nnsight": float("inf"),
    }
    results = {}

    def run(key: str) -> None:
        start = time.perf_counter()
        if key == "tl":
            results[key] = tl_patching_loop(model, probes, features)
        elif key == "hooks":
            results[key] = hook_idiom(model, probes, features, per_pass=features_per_pass)
        elif key == "nnsight":
            results[key] = nnsight_idiom(model, probes, features, per_pass=features_per_pass)
        else:
            with no_block_skipping() if key == "no_skip" else contextlib.nullcontext():
                results[key] = exact_effects(
                    model, probes, features, "resample", batch_size=batch_size,
                    features_per_pass=features_per_pass, progress=False,
                ).values  # fmt: skip
        times[key] = min(times[key], time.perf_counter() - start)

    keys = ("tl", "exact") + (("no_skip",) if ablate else ()) + (("hooks",) if peers else ())
    if peers:
        try:
            import nnsight  # noqa: F401
        except ImportError:
            print("  nnsight is not installed (pip install nnsight==0.8.0): its idiom is skipped")
        else:
            keys += ("nnsight",)
    for _ in range(repeats):  # interleaved, so all see the same machine load
        for key in keys:
            run(key)
    n, t_tl = len(features), times["tl"]
    layers = sorted({f.layer for f in features})
    print(
        f"exact patching: {n} features (layers {layers[0]}..{layers[-1]}, {len(layers)} of them) x {len(probes)} "
        f"probe examples, resample from the spurious counterfactual"
    )
    print(f"  TransformerLens generic_activation_patch loop (baseline): {1e3 * t_tl / n:8.2f} ms/feature   ratio 1.00")
    label = f"{features_per_pass} features x {batch_size} examples per pass"
    k_label = f"{features_per_pass} features x all {len(probes)} examples per pass"
    out: dict[str, float] = {}
    for key, name in (("exact", f"icp_lens exact_effects ({label})"), ("no_skip", "  ... without block skipping"),
                      ("hooks", f"expert's forward-hook idiom, layer skipping ({k_label})"),
                      ("nnsight", f"nnsight batched invokes ({k_label})")):  # fmt: skip
        if key in results:
            diff = (results[key] - results["tl"]).abs().max().item()
            print(f"  {name}: {1e3 * times[key] / n:8.2f} ms/feature   ratio {t_tl / times[key]:.2f}x faster")
            print(f"    max |its dP - the baseline's dP| = {diff:.2e}")
            out.update({f"ratio_{key}": t_tl / times[key], f"max_abs_diff_{key}": diff})
    out["ratio"], out["max_abs_diff"] = out["ratio_exact"], out["max_abs_diff_exact"]
    peer_times = {key: times[key] for key in ("hooks", "nnsight") if key in results}
    if peer_times:
        fastest = min(peer_times, key=peer_times.__getitem__)
        print(f"  icp_lens exact_effects against the fastest peer ({fastest}): "
              f"{peer_times[fastest] / times['exact']:.2f}x faster (target >= 3x)")  # fmt: skip
        out.update({f"ratio_vs_{key}": t / times["exact"] for key, t in peer_times.items()})
    return out


def float64_agreement(model, probes: ProbeSet, features: Sequence[Feature], *, batch_size: int = 32,
                      features_per_pass: int = 64) -> dict[str, float]:  # fmt: skip
    """Equality without float32 round-off: both sides again in float64, on ``features``.

    Printed: max |exact_effects - baseline| in float64 (what "equal" means once rounding is
    gone), and the float32 rounding floor: how far the baseline's own float32 values lie
    from its float64 values. A float32 difference between the two sides at or below that
    floor is round-off (a KV cache sums the prefix in another order), not a wrong result.
    """

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        tl = tl_patching_loop(model, probes, features).double()
        ex = exact_effects(model, probes, features, "resample", batch_size=batch_size,
                           features_per_pass=features_per_pass, progress=False).values.double()  # fmt: skip
        return tl, ex

    tl32, ex32 = both()
    model.to(torch.float64)
    try:  # the probe tokens do not depend on the dtype
        tl64, ex64 = both()
    finally:
        model.to(torch.float32)
    out = {
        "max_abs_diff_fp32": (ex32 - tl32).abs().max().item(),
        "max_abs_diff_fp64": (ex64 - tl64).abs().max().item(),
        "fp32_floor_baseline": (tl32 - tl64).abs().max().item(),
        "fp32_floor_exact": (ex32 - tl64).abs().max().item(),
    }
    print(f"  float64 check on {len(features)} features: max |exact_effects - baseline| float32 "
          f"{out['max_abs_diff_fp32']:.2e}, float64 {out['max_abs_diff_fp64']:.2e}; float32 rounding floor "
          f"(baseline float32 vs float64) {out['fp32_floor_baseline']:.2e}, exact_effects float32 vs "
          f"baseline float64 {out['fp32_floor_exact']:.2e}")  # fmt: skip
    return out


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
    parser.add_argument("--features", type=int, default=0, help="N MLP neurons spread over all layers (0: all)")
    parser.add_argument("--first", action="store_true", help="--features takes the first N neurons instead")
    parser.add_argument("--ablate", action="store_true", help="also time exact_effects without block skipping")
    parser.add_argument("--peers", action="store_true",
                        help="also time the expert's forward-hook idiom (Llama family, e.g. smollm2)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features-per-pass", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--float64",
        type=int,
        default=0,
        metavar="N",
        help="also compare both sides in float64 on N of the features (the float32 rounding floor)",
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for both sides (0: torch's default); one thread keeps timings stable on a shared machine",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        from icp_lens.loading import SMOLLM2, canonical_name, load_bridge
        from icp_lens.probes import read_probes

        if not args.probes and canonical_name(args.model) != SMOLLM2:
            parser.error("--model needs --probes (except smollm2: the pronoun probes)")
        model = load_bridge(args.model)
        if args.probes:
            examples = read_probes(args.probes, tokenizer=model.tokenizer)
        else:
            import _repo_root  # noqa: F401  (examples/ imports from the repository root)

            from examples.smollm2_case.pronouns import pronoun_probes

            examples = pronoun_probes("train")
        probes = ProbeSet(model, examples[: args.examples])
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
        if args.features:
            features = features[: args.features] if args.first else spread(features, args.features)
        bench_exact(
            model, probes, features, batch_size=args.batch_size, features_per_pass=args.features_per_pass,
            repeats=args.repeats, ablate=args.ablate, peers=args.peers,
        )  # fmt: skip
        if args.float64:
            float64_agreement(model, probes, spread(features, args.float64), batch_size=args.batch_size,
                              features_per_pass=args.features_per_pass)  # fmt: skip
    if args.section in ("attribution", "all"):
        bench_attribution(model, probes)


if __name__ == "__main__":
    main()

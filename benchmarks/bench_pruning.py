"""Pruner: export time against a plain ``save_pretrained``, and verification error, in one run.

For each model (default: the lexical organism in all three architectures, seed 0; or
``--model DIR [--probes FILE.jsonl]``, e.g. SmolLM2):

1. a plan: the ``--features`` highest-|mean| neurons and heads is not the point here,
   so the plan takes a fixed, spread-out set (every layer's first and last head and
   four neurons per layer), in zero and in mean mode (means over the probe prompts);
2. export time: ``export_checkpoint`` (weights + config + tokenizer + plan, atomic)
   against ``model.save_pretrained`` of the same edited model into an empty
   directory, best of ``--repeats``, printed as a ratio (target <= 1.5x);
3. verification: ``apply_plan``'s reload with ``transformers`` alone against the
   original ablated at run time on the probe prompts (target: max |logit diff| <= 1e-5
   fp32), by module hooks on the HF model and by icp_lens hooks on the bridge, with the
   floor of the latter (bridge vs HF with no ablation at all); plus parameters zeroed,
   file size and latency before/after.

    python benchmarks/bench_pruning.py [--arch gpt2,llama,neox] [--repeats 3]
        [--model HF_DIR --probes FILE.jsonl] [--prompts 64] [--modes zero,mean]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from icp_lens import Feature
from icp_lens.model import boot_bridge, model_dims
from icp_lens.pruning import apply_plan, apply_plan_to_model, clean_hf_model, export_checkpoint, make_plan
from icp_lens.pruning.means import reference_texts
from icp_lens.pruning.source import load_tokenizer


def spread_features(bridge) -> list[Feature]:
    dims = model_dims(bridge)
    feats = []
    for layer in range(dims.n_layers):
        feats += [Feature("head", layer, 0), Feature("head", layer, dims.n_heads - 1)]
        feats += [Feature("neuron", layer, i) for i in range(0, dims.d_mlp, max(1, dims.d_mlp // 4))][:4]
    return feats


def interleaved_best(fns: dict, repeats: int, cleanup) -> dict[str, float]:
    """Best wall time of each function, alternating them (so page-cache pressure hits both alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            cleanup()
    return {name: min(t[1:]) for name, t in times.items()}


def bench_model(model_dir: Path, probes: Path, *, repeats: int, n_prompts: int, name: str, mode: str) -> dict:
    bridge = boot_bridge(model_dir)
    prompts = reference_texts(probes)[:n_prompts]
    plan = make_plan(bridge, spread_features(bridge), mode=mode, reference=prompts, hf=model_dir)
    tokenizer = load_tokenizer(model_dir)
    edited, _ = apply_plan_to_model(clean_hf_model(model_dir), plan)
    root = Path(tempfile.mkdtemp(prefix="bench_pruning_"))
    try:

        def plain() -> None:
            edited.save_pretrained(root / "plain")

        def ours() -> None:
            export_checkpoint(edited, root / "ours", tokenizer=tokenizer, plan=plan)

        def cleanup() -> None:
            for name in ("plain", "ours"):
                shutil.rmtree(root / name, ignore_errors=True)

        best = interleaved_best({"plain": plain, "ours": ours}, repeats, cleanup)
        t_plain, t_ours = best["plain"], best["ours"]
        result = apply_plan(model_dir, plan, root / "verified", prompts=prompts, reference=bridge)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    v = result.verification
    row = {
        "model": name,
        "mode": mode,
        "features": len(plan.features),
        "save_pretrained_s": t_plain,
        "export_s": t_ours,
        "export_ratio": t_ours / t_plain,
        "max_abs_logit_diff": v.max_abs_logit_diff,
        "fp64_diff": v.fp64_max_abs_logit_diff,
        "rounding_floor": v.rounding_floor,
        "passed": v.passed,
        "vs_hooks": v.hooked_max_abs_logit_diff,
        "hooked_vs_hf_floor": v.implementation_floor,
        "zeroed_pct": 100 * v.zeroed_fraction,
        "file_mib": v.file_size_bytes / 2**20,
        "latency_before_ms": v.latency_before_ms,
        "latency_after_ms": v.latency_after_ms,
    }
    print(
        f"{name}, {mode} mode: {row['features']} features | export {t_ours:.3f} s vs save_pretrained {t_plain:.3f} s "
        f"= {row['export_ratio']:.2f}x (target <= 1.5x) | max |logit diff| {v.max_abs_logit_diff:.2e} "
        f"(target <= 1e-5) on {v.n_inputs} prompts{_fp64(v)}; vs icp_lens hooks {v.hooked_max_abs_logit_diff:.2e} "
        f"(bridge vs HF unedited: {v.implementation_floor:.2e}) | zeroed {row['zeroed_pct']:.3f}% | "
        f"{row['file_mib']:.1f} MiB | latency {v.latency_before_ms:.1f} -> {v.latency_after_ms:.1f} ms",
        flush=True,
    )
    return row


def _fp64(v) -> str:
    if v.fp64_max_abs_logit_diff is None:
        return ""
    return f" (fp32 rounding floor {v.rounding_floor:.1e}; in float64: {v.fp64_max_abs_logit_diff:.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gpt2,llama,neox")
    parser.add_argument("--model", type=Path, default=None, help="an HF checkpoint instead of the organisms")
    parser.add_argument("--probes", type=Path, default=None, help="probe JSONL for --model")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="zero,mean")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    if args.model is not None:
        if args.probes is None:
            parser.error("--model needs --probes")
        for mode in args.modes.split(","):
            rows.append(
                bench_model(
                    args.model,
                    args.probes,
                    repeats=args.repeats,
                    n_prompts=args.prompts,
                    name=args.model.name,
                    mode=mode,
                )
            )
    else:
        from icp_lens.organisms import build_organism

        for arch in args.arch.split(","):
            org = build_organism(arch=arch)
            for mode in args.modes.split(","):
                rows.append(
                    bench_model(
                        org.model_dir,
                        org.data_path("probe"),
                        repeats=args.repeats,
                        n_prompts=args.prompts,
                        name=f"organism lexical/{arch}",
                        mode=mode,
                    )
                )
    import pandas as pd

    print()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4g}"))


if __name__ == "__main__":
    main()

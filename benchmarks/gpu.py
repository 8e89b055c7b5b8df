"""SmolLM2-135M on one device: hybrid scoring, an exact sweep, an invariance step, export.

Ready for a machine with a GPU (``--device cuda``); runs on the CPU too (``--quick`` for
a reduced run that checks the script). Prints absolute seconds, tokens/s and peak memory
(CUDA's allocator peak on a GPU, the process's peak RSS on the CPU) for:

1. hybrid scoring of every MLP neuron and attention head (46,080 + 270 = 46,350
   features; ``--quick``: two layers), the top ``--verify-top`` verified exactly;
2. an exact sweep of ``--exact-neurons`` neurons spread over all layers;
3. one invariance training step (LoRA), against a plain task-loss step: the ratio;
4. the export of a pruned checkpoint (top 16 neurons), against ``save_pretrained``: the ratio.

    python benchmarks/gpu.py --device cuda                 # the full run (a GPU)
    python benchmarks/gpu.py --device cpu --quick          # a few minutes on a CPU
    python benchmarks/gpu.py --device cuda --json gpu.json # also write the figures

The issue's GPU target (all 46,350 features hybrid-scored, top 1,000 verified, in <= 60 s
on one H200-class GPU) is step 1 with the defaults.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _timed(device: torch.device, fn: Any) -> tuple[Any, float]:
    _reset_peak(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="two layers, few examples: checks the script on a CPU")
    parser.add_argument("--examples", type=int, default=None, help="probe examples (default 64; --quick 8)")
    parser.add_argument("--verify-top", type=int, default=None, help="hybrid: verified exactly (default 1000; quick 20)")
    parser.add_argument("--exact-neurons", type=int, default=None, help="exact sweep size (default 2048; quick 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import _repo_root  # noqa: F401  (examples/ imports from the repository root)

    from examples.smollm2_case.pronouns import pronoun_probes
    from icp_lens.devices import resolve_device, resolve_dtype
    from icp_lens.features import Feature
    from icp_lens.loading import SMOLLM2, load_bridge, prepare_offline_model
    from icp_lens.model import model_dims
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score
    from icp_lens.scoring.exact import exact_effects

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    n_examples = args.examples or (8 if args.quick else 64)
    verify_top = args.verify_top if args.verify_top is not None else (20 if args.quick else 1000)
    n_exact = args.exact_neurons or (64 if args.quick else 2048)
    path = prepare_offline_model(SMOLLM2).path
    model = load_bridge(path, device=str(device), dtype=dtype)
    dims = model_dims(model)
    probes = ProbeSet(model, pronoun_probes("train")[:n_examples])
    tokens = sum(int(b.tokens.numel()) for b in probes.batches(args.batch_size))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"SmolLM2-135M on {name} ({dtype}); {len(probes)} probes, {tokens} tokens per pass over them")
    figures: dict[str, Any] = {"device": name, "dtype": args.dtype, "examples": len(probes), "quick": args.quick}

    layers = [0, 1] if args.quick else None
    table, seconds = _timed(device, lambda: score(model, probes, method="hybrid", kinds=("neuron", "head"),
                                                  layers=layers, verify_top=verify_top, batch_size=args.batch_size,
                                                  causal=False, progress=False))  # fmt: skip
    figures["hybrid"] = {"features": len(table), "verified": int(table.frame["exact"].sum()), "seconds": seconds,
                         "peak_bytes": _peak_bytes(device)}  # fmt: skip
    print(f"1. hybrid: {len(table)} features, {figures['hybrid']['verified']} verified: {seconds:.1f} s, "
          f"peak {figures['hybrid']['peak_bytes'] / 2**30:.2f} GiB")  # fmt: skip

    step = max(1, dims.n_layers * dims.d_mlp // n_exact)
    neurons = [Feature("neuron", i // dims.d_mlp, i % dims.d_mlp) for i in range(0, dims.n_layers * dims.d_mlp, step)]
    neurons = neurons[:n_exact]
    _, seconds = _timed(device, lambda: exact_effects(model, probes, neurons, "resample",
                                                      batch_size=args.batch_size, progress=False))  # fmt: skip
    passes_tokens = tokens * len(neurons)
    figures["exact"] = {"features": len(neurons), "seconds": seconds, "tokens_per_s": passes_tokens / seconds,
                        "peak_bytes": _peak_bytes(device)}  # fmt: skip
    print(f"2. exact sweep: {len(neurons)} neurons: {seconds:.1f} s, {passes_tokens / seconds:,.0f} patched tokens/s, "
          f"peak {figures['exact']['peak_bytes'] / 2**30:.2f} GiB")  # fmt: skip

    from icp_lens.training import TrainConfig, Trainer

    examples = pronoun_probes("train")[: max(8, n_examples)]
    top = [f for f in table.features if f.kind == "neuron"][:8]
    step_seconds = {}
    for objective in ("erm", "invariance"):
        def fit(steps: int, objective: str = objective) -> float:  # seconds of fit() alone
            config = TrainConfig(objective=objective, lora=True, epochs=1000, max_steps=steps, batch_size=8,
                                 progress=False, seed=0)  # fmt: skip
            feats = top if objective != "erm" else ()
            trainer = Trainer(path, examples, config, features=feats, device=str(device))
            return _timed(device, trainer.fit)[1]

        # the marginal cost of a step: (6 steps - 2 steps) / 4, set-up and first-step warm-up cancelled
        step_seconds[objective] = (fit(6) - fit(2)) / 4
    figures["training_step"] = {**{f"{k}_s": v for k, v in step_seconds.items()},
                                "ratio": step_seconds["invariance"] / step_seconds["erm"]}  # fmt: skip
    print(f"3. training step (LoRA, batch 8): invariance {step_seconds['invariance']:.3f} s, plain "
          f"{step_seconds['erm']:.3f} s: {figures['training_step']['ratio']:.2f}x")  # fmt: skip

    from icp_lens.pruning import load_checkpoint, prune

    with tempfile.TemporaryDirectory() as tmp:
        plain, base = _timed(torch.device("cpu"), lambda: load_checkpoint(path).save_pretrained(Path(tmp) / "plain"))
        _, seconds = _timed(torch.device("cpu"), lambda: prune(path, [str(f) for f in top], Path(tmp) / "pruned", top_k=len(top)))
    figures["export"] = {"seconds": seconds, "save_pretrained_s": base, "ratio": seconds / base}
    print(f"4. prune + export + verify (8 neurons): {seconds:.1f} s = {seconds / base:.1f}x save_pretrained ({base:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures -> {args.json}")


if __name__ == "__main__":
    main()

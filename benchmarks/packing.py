"""Batch packing vs one forward pass per intervention.

Zero-ablates every MLP neuron of the default organism, one at a time (the baseline) and
packed K per forward pass along the batch, on the same probe prompts, and prints the
speed-up as a ratio against the baseline measured in this run, plus the largest
difference between the two (packing must not change results).

    python benchmarks/packing.py [--prompts 32] [--max-rows 2048]
"""

from __future__ import annotations

import argparse
import time

import torch

from icp_lens import Edit, Zero, enumerate_features, run_packed, run_with_edits, to_tokens
from icp_lens.organisms import build_organism


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-rows", type=int, default=2048)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    organism = build_organism()
    model = organism.load_bridge()
    tokens = to_tokens(model, [ex.prompt for ex in organism.probes("probe")[: args.prompts]])
    groups = [Edit(f, Zero()) for f in enumerate_features(model, "neuron")]
    last = lambda logits: logits[:, -1]  # noqa: E731

    start = time.perf_counter()
    baseline = torch.stack([run_with_edits(model, tokens, g)[:, -1] for g in groups])
    t_loop = time.perf_counter() - start

    start = time.perf_counter()
    packed = run_packed(model, tokens, groups, max_rows=args.max_rows, reduce=last)
    t_packed = time.perf_counter() - start

    diff = (packed - baseline).abs().max().item()
    print(f"{len(groups)} single-neuron ablations x {tokens.shape[0]} prompts of {tokens.shape[1]} tokens")
    print(f"one pass per intervention (baseline): {t_loop:7.2f} s   ratio 1.00")
    print(f"packed, <= {args.max_rows} rows per pass:  {t_packed:7.2f} s   ratio {t_loop / t_packed:.2f}x faster")
    print(f"max |packed - baseline| = {diff:.2e}")


if __name__ == "__main__":
    main()

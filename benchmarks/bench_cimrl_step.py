"""Cost of a CIMRL training step against an ERM step on the multimodal organism.

Issue 21's target is a CIMRL step at most 2x an ERM step. This times ``train_multimodal``
from the organism's checkpoint (``icp-lens organism --variant waterbirds``, seed 0;
8,000 training images, batch 64) for ``--steps`` steps of each objective, the objectives
interleaved and repeated, and prints the best seconds per step and the ratio to ERM's in
the same run. What a step computes (rows per pass, batch ``B``): ERM ``B``; contrastive
``B`` + the background swaps of the 3/4 of rows that have one; CIMRL that plus
``intervention_rows * B`` gradient-attribution counterfactuals ``x + delta`` (the default
share, 0.5, was chosen on validation data: ``multimodal_table.py --select-cost``) and, every
``attribution_every`` steps, one forward and backward pass for the attribution mask; the
disentanglement heads are three linear maps. The last two rows are settings that choice
rejected: every row with ``x + delta`` (the cost before) and the background swaps under
stop-gradient (a forward pass without backward; it lost the invariance). Every row trains with
the library's attention default (``attention="auto"``: eager attention on the CPU for this
19-position prompt, :mod:`icp_lens.training.attention`) except the two ``sdpa attention`` rows,
ERM and CIMRL under the model's loaded kernel, PyTorch's ``scaled_dot_product_attention``
(the default before; its CPU kernel made a CIMRL step 1.9-2.3x an ERM step).

    python benchmarks/bench_cimrl_step.py [--steps 40] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

VARIANTS = {  # name -> (objective, omega, other settings; the library's defaults where empty)
    "erm": ("erm", (1.0, 0.3, 1.0), {}),
    "contrastive": ("contrastive", (1.0, 0.3, 1.0), {}),
    "cimrl - intervention": ("cimrl", (1.0, 0.3, 0.0), {}),
    "cimrl": ("cimrl", (1.0, 0.3, 1.0), {}),
    "cimrl, x + delta every row": ("cimrl", (1.0, 0.3, 1.0), {"intervention_rows": 1.0}),
    "cimrl, stop-gradient views": ("cimrl", (1.0, 0.3, 1.0), {"stop_gradient": True}),
    "cimrl, views on three quarters": ("cimrl", (1.0, 0.3, 1.0), {"view_rows": 0.75}),
    "cimrl, views on half": ("cimrl", (1.0, 0.3, 1.0), {"view_rows": 0.5}),
    "erm, sdpa attention": ("erm", (1.0, 0.3, 1.0), {"attention": "sdpa"}),
    "cimrl, sdpa attention": ("cimrl", (1.0, 0.3, 1.0), {"attention": "sdpa"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from icp_lens.organisms.multimodal import build_waterbirds
    from icp_lens.training.multimodal import MultimodalTrainConfig, data_from_probes, train_multimodal

    torch.set_num_threads(args.threads)
    org = build_waterbirds(seed=0, progress=True)
    data = data_from_probes(org.data_path("train"), org.load_processor())
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (objective, omega, extra) in VARIANTS.items():
            model = org.load_hf()
            config = MultimodalTrainConfig(objective=objective, omega=omega, steps=args.steps, seed=0, **extra)  # type: ignore[arg-type]
            start = time.perf_counter()
            train_multimodal(model, data, config)
            per_step = (time.perf_counter() - start) / args.steps
            best[name] = min(best.get(name, float("inf")), per_step)
    erm = best["erm"]
    print(f"{args.steps} steps of batch 64, best of {args.repeats}, {args.threads} thread(s)")
    print(f"{'objective':>30}  {'ms / step':>9}  {'vs ERM':>6}")
    for name, seconds in best.items():
        print(f"{name:>30}  {1000 * seconds:9.1f}  {seconds / erm:6.2f}x")
    print(f"target: cimrl <= 2.00x erm; measured {best['cimrl'] / erm:.2f}x "
          f"(both under sdpa attention: {best['cimrl, sdpa attention'] / best['erm, sdpa attention']:.2f}x)")


if __name__ == "__main__":
    main()

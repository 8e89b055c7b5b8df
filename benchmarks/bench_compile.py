"""Does ``torch.compile`` pay for icp_lens's forward passes? Eager against compiled, one run.

The exact scorer's cost is forward passes of the model at small batches of short
prompts (``--batch`` x ``--seq`` tokens), most with one patching hook on the bridge. This
times, on SmolLM2-135M (``icp-lens fetch-model smollm2``; ``--model DIR`` for another):

- the HF model eager, and ``torch.compile(model)`` (inductor): the compile time and the
  best of ``--repeats`` passes after it, and the largest logit difference;
- the ``TransformerBridge`` with a patching hook attached (``icp_lens.hooks.hooked``), eager
  and under ``torch.compile`` (the hook runs Python, which the compiler must trace or
  break around).

It prints absolute milliseconds and the compiled/eager ratios (below 1: compile pays).
No GPU is needed; on a GPU machine run it with ``--device cuda``.

    python benchmarks/bench_compile.py [--batch 16] [--seq 16] [--repeats 5] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from icp_lens.hooks import hooked
    from icp_lens.loading import resolve_model_dir
    from icp_lens.model import boot_bridge

    torch.set_num_threads(args.threads)
    path = resolve_model_dir(args.model)
    bridge = boot_bridge(path, device=args.device)
    hf = bridge.original_model
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    hook = "blocks.10.mlp.hook_post"
    patch = [(hook, lambda act, hook: act * 0.5)]

    def patched(model):
        with hooked(bridge, patch):
            return model(ids)

    rows = []
    with torch.no_grad():
        for name, eager, make in (
            ("HF model", lambda: hf(ids).logits, lambda: torch.compile(hf)),
            ("bridge + patching hook", lambda: patched(bridge), lambda: torch.compile(bridge)),
        ):
            eager_s = _best(eager, args.repeats)
            start = time.perf_counter()
            try:
                compiled = make()
                run = (lambda c=compiled: c(ids).logits) if name == "HF model" else (lambda c=compiled: patched(c))
                reference, got = eager(), run()
                compile_s = time.perf_counter() - start
                compiled_s = _best(run, args.repeats)
                diff = float((reference - got).abs().max())
                rows.append((name, eager_s, compiled_s, compile_s, diff, ""))
            except Exception as err:  # the compiler's failures are the finding, not a crash
                rows.append((name, eager_s, float("nan"), time.perf_counter() - start, float("nan"),
                             f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"))  # fmt: skip
    print(f"{path.name}, batch {args.batch} x {args.seq} tokens, {args.threads} thread(s), {args.device}, "
          f"best of {args.repeats}")  # fmt: skip
    print(f"{'pass':>24}  {'eager ms':>8}  {'compiled ms':>11}  {'ratio':>5}  {'compile s':>9}  {'max diff':>8}")
    for name, eager_s, compiled_s, compile_s, diff, error in rows:
        ratio = compiled_s / eager_s
        print(f"{name:>24}  {1000 * eager_s:8.1f}  {1000 * compiled_s:11.1f}  {ratio:5.2f}  {compile_s:9.1f}  "
              f"{diff:8.1e}  {error}")  # fmt: skip


if __name__ == "__main__":
    main()

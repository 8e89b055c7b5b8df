"""Peak memory of hybrid scoring against the number of features, measured in the same run.

Issue 22's memory target: the exact scorer's peak memory grows with the batch size and
the pass size, not with the number of features. Here the hybrid (attribution ranks every
feature, the top ``--verify`` are patched exactly) scores SmolLM2-135M on ``--examples``
profession -> pronoun probes (``examples.smollm2_case.pronouns``, ``train``) twice, each in a
fresh process: once on 512 neuron/head features spread evenly over the layers, once on
all 46,350 of them. Each process loads the model, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), scores, and reports:

* its peak RSS while scoring (model weights included) and the increase over the RSS
  right after loading (what scoring itself holds);
* the ratio of the two runs' peaks (target: all features within 1.2x of 512 features).

    python benchmarks/scoring_memory.py [--examples 16] [--verify 32] [--small 512]
    python benchmarks/scoring_memory.py --peers [--examples 16] [--neurons 128]

``--peers`` measures instead the peak RSS of exact patching (``exact_effects``, 64
features x 32 examples per pass) against the expert's forward-hook idiom of
``bench_scoring.py`` (64 neurons x all examples per pass) on the same ``--neurons``
neurons, each in a fresh process (issue 22: no higher peak than the hook idiom).

Linux only (``/proc``). Scoring runs with one torch thread; timings are printed for
orientation only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _worker(n_features: int, n_examples: int, verify: int) -> None:
    import _repo_root  # noqa: F401  (examples/ imports from the repository root)
    import torch

    from examples.smollm2_case.pronouns import pronoun_probes
    from icp_lens.loading import load_bridge
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score
    from icp_lens.scoring.hybrid import all_features

    torch.set_num_threads(1)
    model = load_bridge("smollm2")
    probes = ProbeSet(model, pronoun_probes("train")[:n_examples])
    features = all_features(model, ["neuron", "head"], None)
    if n_features and n_features < len(features):
        step = len(features) / n_features
        features = [features[int(i * step)] for i in range(n_features)]
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    loaded = _rss_kib("VmRSS")
    tic = time.perf_counter()
    table = score(model, probes, method="hybrid", features=features, verify_top=verify, progress=False)
    seconds = time.perf_counter() - tic
    peak = _rss_kib("VmHWM")
    print(json.dumps({"features": len(features), "rows": len(table), "loaded_mib": loaded / 1024,
                      "peak_mib": peak / 1024, "seconds": seconds}))  # fmt: skip


def _peer_worker(method: str, n_neurons: int, n_examples: int) -> None:
    import _repo_root  # noqa: F401  (examples/ imports from the repository root)
    import torch
    from bench_scoring import hook_idiom, spread

    from examples.smollm2_case.pronouns import pronoun_probes
    from icp_lens.features import enumerate_features
    from icp_lens.loading import load_bridge
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring.exact import exact_effects

    torch.set_num_threads(1)
    model = load_bridge("smollm2")
    probes = ProbeSet(model, pronoun_probes("train")[:n_examples])
    features = spread(enumerate_features(model, "neuron"), n_neurons)
    Path("/proc/self/clear_refs").write_text("5")
    loaded = _rss_kib("VmRSS")
    tic = time.perf_counter()
    with torch.no_grad():
        if method == "exact":
            exact_effects(model, probes, features, "resample", progress=False)
        else:
            hook_idiom(model, probes, features, per_pass=64)
    seconds = time.perf_counter() - tic
    print(json.dumps({"method": method, "features": len(features), "loaded_mib": loaded / 1024,
                      "peak_mib": _rss_kib("VmHWM") / 1024, "seconds": seconds}))  # fmt: skip


def _peers(args: argparse.Namespace) -> None:
    results = {}
    for method in ("hooks", "exact"):
        run = subprocess.run([sys.executable, __file__, "--peer-worker", method, "--neurons", str(args.neurons),
                              "--examples", str(args.examples)], capture_output=True, text=True)  # fmt: skip
        if run.returncode != 0:
            raise SystemExit(f"{method} worker failed:\n{run.stderr[-3000:]}")
        results[method] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"SmolLM2-135M exact patching, {args.neurons} neurons x {args.examples} examples, 1 thread")
    for method, name in (("hooks", "forward-hook idiom"), ("exact", "icp_lens exact_effects")):
        r = results[method]
        held = r["peak_mib"] - r["loaded_mib"]
        print(f"  {name:24s} peak RSS {r['peak_mib']:7.0f} MiB (+{held:6.0f} MiB over the loaded model), "
              f"{r['seconds']:6.1f} s")  # fmt: skip
    ratio = results["exact"]["peak_mib"] / results["hooks"]["peak_mib"]
    print(f"  peak RSS exact / hooks: {ratio:.2f}x (target <= 1.0x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--verify", type=int, default=32, help="features verified exactly (the same in both runs)")
    parser.add_argument("--small", type=int, default=512, help="features in the small run")
    parser.add_argument("--peers", action="store_true", help="exact_effects against the forward-hook idiom")
    parser.add_argument("--neurons", type=int, default=128, help="neurons patched in --peers")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.examples, args.verify)
        return
    if args.peer_worker is not None:
        _peer_worker(args.peer_worker, args.neurons, args.examples)
        return
    if args.peers:
        _peers(args)
        return
    results = []
    for n in (args.small, 0):
        run = subprocess.run([sys.executable, __file__, "--worker", str(n), "--examples", str(args.examples),
                              "--verify", str(args.verify)], capture_output=True, text=True)  # fmt: skip
        if run.returncode != 0:
            raise SystemExit(f"worker ({n or 'all'} features) failed:\n{run.stderr[-3000:]}")
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"SmolLM2-135M hybrid scoring, {args.examples} examples, top {args.verify} verified exactly, 1 thread")
    for r in results:
        held = r["peak_mib"] - r["loaded_mib"]
        print(f"  {r['features']:6d} features: peak RSS {r['peak_mib']:7.0f} MiB "
              f"(+{held:6.0f} MiB over the loaded model), {r['seconds']:6.1f} s")  # fmt: skip
    small, large = results
    grow = (large["peak_mib"] - large["loaded_mib"]) / max(small["peak_mib"] - small["loaded_mib"], 1e-9)
    print(f"  peak RSS ratio: {large['peak_mib'] / small['peak_mib']:.2f}x (target <= 1.2x); "
          f"scoring's own increase {grow:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

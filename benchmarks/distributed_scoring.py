"""Two processes under torchrun against one, measured in the same run (issue 22's target).

Exact scoring (``--method exact``, every neuron and head, resample) of the default organism
(lexical / gpt2 / seed 0) on the first ``--examples`` rows of its ``probe.jsonl``, once as
one process and once under ``torchrun --nproc-per-node N --standalone``, every process with
one torch thread (``OMP_NUM_THREADS=1``). Two measurements, each best of ``--repeats``:

* **scoring**: the seconds ``score(...)`` takes inside the process group (this file run as
  a worker: the model loads, the ranks meet at a barrier, then the clock runs), the part
  the ranks split;
* **command**: ``icp-lens score`` end to end as its own line reports it (model loading,
  probe tokenisation and writing included: each rank loads the whole model) and the wall
  time of the launch (Python, torch and torchrun start-up included).

It prints the seconds, their ratios (target: scoring >= 1.6x for 2 processes on a 2-core
machine) and the largest difference between the tables' scores (target: <= 1e-6).

    python benchmarks/distributed_scoring.py [--nproc 2] [--examples 400] [--repeats 2]

The organism is built (or taken from the cache) first; scratch files go to a temporary
folder. Run it on an otherwise idle machine: another job on the same cores skews both.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str]) -> tuple[str, float]:
    """(stdout, wall seconds) of one launch; exits with its stderr on failure."""
    tic = time.perf_counter()
    run = subprocess.run(cmd, env={**os.environ, **_ENV}, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:8])} ... failed:\n{run.stderr[-3000:]}")
    return run.stdout, wall


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]


def _worker(model_dir: str, probe: str, out: str) -> None:
    """One rank: load, meet, time ``score`` alone; rank 0 prints the seconds and saves the table."""
    import torch

    from icp_lens.distributed import barrier, init_from_env, is_main
    from icp_lens.model import boot_bridge
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"))
    model = boot_bridge(model_dir, device="cpu")
    probes = ProbeSet.from_jsonl(model, probe)
    barrier()
    tic = time.perf_counter()
    table = score(model, probes, method="exact", kinds=["neuron", "head"], progress=False)
    seconds = time.perf_counter() - tic
    if is_main():
        table.save(out)
        print(f"SCORING_SECONDS {seconds:.4f}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--examples", type=int, default=400, help="probe examples (the first N of probe.jsonl)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N launches for each side")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "PROBE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return

    import pandas as pd

    from icp_lens.organisms import build_organism

    organism = build_organism(variant="lexical", arch="gpt2", seed=0)
    cli = str(Path(sys.executable).with_name("icp-lens"))
    sides = (1, args.nproc)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.jsonl"
        lines = organism.data_path("probe").read_text().splitlines()[: args.examples]
        probe.write_text("\n".join(lines) + "\n")
        base = ["score", "--model", str(organism.model_dir), "--probe", str(probe), "--method", "exact",
                "--kinds", "neuron,head", "--quiet", "--device", "cpu"]  # fmt: skip
        scoring: dict[int, list[float]] = {n: [] for n in sides}
        command: dict[int, list[tuple[float, float]]] = {n: [] for n in sides}
        for _ in range(args.repeats):  # alternate, so drift in the machine's load hits both sides
            for n in sides:
                launcher = _torchrun(n) if n > 1 else []
                out, _ = _run([*launcher, *([] if n > 1 else [sys.executable]), __file__, "--worker",
                               str(organism.model_dir), str(probe), str(Path(tmp) / f"w{n}.csv")])  # fmt: skip
                scoring[n].append(float(re.search(r"SCORING_SECONDS ([0-9.]+)", out).group(1)))
                launcher = [*_torchrun(n), "--no-python"] if n > 1 else []
                out, wall = _run([*launcher, cli, *base, "--out", str(Path(tmp) / f"c{n}.csv")])
                found = re.search(r"probes in ([0-9.]+) s", out)
                command[n].append((float(found.group(1)) if found else float("nan"), wall))
        tables = {name: pd.read_csv(Path(tmp) / f"{name}.csv").set_index("feature").sort_index()
                  for name in ("w1", f"w{args.nproc}", "c1", f"c{args.nproc}")}  # fmt: skip
        ref = tables["w1"]["score"]
        diff = max(float((ref - t["score"]).abs().max()) for t in tables.values())
    s1, sn = min(scoring[1]), min(scoring[args.nproc])
    c1, cn = min(t[0] for t in command[1]), min(t[0] for t in command[args.nproc])
    w1, wn = min(t[1] for t in command[1]), min(t[1] for t in command[args.nproc])
    n = args.nproc
    print(f"exact scoring, {len(ref)} features x {len(lines)} examples, 1 thread per process, best of {args.repeats}")
    print(f"  scoring:  1 process {s1:7.2f} s, {n} processes {sn:7.2f} s -> {s1 / sn:.2f}x (target >= 1.6x)")
    print(
        f"  command:  1 process {c1:7.2f} s, {n} processes {cn:7.2f} s -> {c1 / cn:.2f}x (model loading on every rank)"
    )
    print(f"  launch:   1 process {w1:7.2f} s, {n} processes {wn:7.2f} s -> {w1 / wn:.2f}x (start-up included)")
    print(f"  max |score difference| across the four tables {diff:.2e} (target <= 1e-6)")


if __name__ == "__main__":
    main()

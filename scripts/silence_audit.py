"""How long does a README command stay silent? The longest gap between two pieces of output.

    python scripts/silence_audit.py                 # the README's commands, empty cache
    python scripts/silence_audit.py --warm          # the same with the cache this run built

Each command runs in a scratch directory with ``ICP_LENS_CACHE`` pointing at an empty
folder (``--warm``: the folder the first pass filled), Python unbuffered, and every chunk
of its stdout and stderr (progress-bar updates included) is time-stamped as it arrives.
The figure per command is the longest silence: the largest gap between two chunks, or
between the start and the first chunk. The README promises none longer than 10 s; the
table says which commands keep it. Results go to ``benchmarks/results/silence_audit.md``.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

#: the README's commands, in its order, as a new user runs them (the install steps aside)
COMMANDS = [
    "icp-lens demo",
    "icp-lens organism --out runs/lexical --variant lexical --arch gpt2 --seed 0",
    "icp-lens score --model runs/lexical/model --probe runs/lexical/probe.jsonl --out scores.csv --method hybrid "
    "--kinds neuron,head --intervention resample --verify-top 100",
    "icp-lens prune --model runs/lexical/model --scores scores.csv --out runs/debiased --top-k 2 --mode mean "
    "--probe runs/lexical/probe.jsonl",
    "icp-lens apply-plan --model runs/lexical/model --plan runs/debiased/plan.json --out runs/again",
    "icp-lens eval --model runs/debiased --data runs/lexical/test_balanced.jsonl",
    "icp-lens train --model runs/lexical/model --train runs/lexical/train.jsonl --out runs/invariant "
    "--scores scores.csv --top-k 4 --objective invariance --lambda 1 --lora --epochs 3 "
    "--val runs/lexical/test_balanced.jsonl --pairs runs/lexical/probe.jsonl",
    "icp-lens fetch-model smollm2",
    "icp-lens audit --model smollm2 --spec spec.json",
    "icp-lens pairs --spec spec.json --model smollm2 --out pairs/ --holdout 0.25",
    "icp-lens train --model smollm2 --train pairs/task.jsonl --pairs pairs/pairs.jsonl --objective consistency "
    "--retain pairs/anchors.txt --max-steps 4 --stage2-steps 0 --out debiased/",
]

SPEC = """{"templates": ["The {x} said that", "Yesterday the {x} wrote that"],
 "spurious": {"female": ["nurse", "secretary"], "male": ["mechanic", "pilot"]},
 "causal":   {"female": ["woman", "mother"],   "male": ["man", "father"]},
 "answers":  {"female": " she", "male": " he"},
 "neutral":  ["person", "worker"]}"""


def run(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, float, float, str]:
    """(return code, seconds, longest silence in seconds, the last output line)."""
    argv = shlex.split(command)
    argv[0] = str(BIN / argv[0])
    start = last = time.perf_counter()
    longest = 0.0
    tail = b""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    open_streams = 2
    while open_streams:
        for key, _ in sel.select(timeout=1.0):
            chunk = key.fileobj.read()
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
            tail = (tail + chunk)[-2000:]
    rc = proc.wait()
    end = time.perf_counter()
    lines = [x for x in tail.decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    return rc, end - start, max(longest, end - last), lines[-1][:100] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", type=int, default=None, help="indices of COMMANDS to run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="silence-"))
    (work / "spec.json").write_text(SPEC)
    env = dict(os.environ, PYTHONUNBUFFERED="1", ICP_LENS_CACHE=str(work / "cache"))
    rows = []
    chosen = [c for i, c in enumerate(COMMANDS) if args.only is None or i in args.only]
    for passes in ("empty cache", "warm cache"):
        for command in chosen:
            rc, seconds, silence, last = run(command, work, env)
            rows.append((passes, command, rc, seconds, silence, last))
            print(f"{passes:11s} rc {rc} {seconds:7.1f} s, longest silence {silence:5.1f} s  {command}", flush=True)
    lines = ["# Silence audit: the longest gap between two pieces of output", "",
             f"`python scripts/silence_audit.py`, {os.cpu_count()} CPUs; a fresh `ICP_LENS_CACHE`, then the same "
             "commands again with the cache they filled. Target: no silence over 10 s.", "",
             "| cache | command | rc | seconds | longest silence (s) | within 10 s |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {p} | `{c}` | {rc} | {s:.1f} | {g:.1f} | {'yes' if g <= 10 else '**no**'} |"
              for p, c, rc, s, g, _ in rows]  # fmt: skip
    lines += ["", "rc 2 on the warm pass: the command's output folder exists from the first pass and it refuses to "
              "replace it without --overwrite, as it should; the silence before that refusal is what is measured."]
    out = ROOT / "benchmarks" / "results" / "silence_audit.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

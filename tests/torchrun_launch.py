"""Launch a command under ``torchrun`` for the tests (2 gloo processes, one thread each).

``python -m torch.distributed.run`` is torch's own launcher (what the ``torchrun`` script
runs), so it is there wherever torch is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def icp_lens_script() -> str:
    """The ``icp-lens`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("icp-lens")
    return str(script) if script.exists() else shutil.which("icp-lens") or "icp-lens"


def torchrun(*argv: str, nproc: int = 2, python: bool = True, fault: str | None = None,
             fault_rank: int | None = None, timeout: int = 900) -> subprocess.CompletedProcess:  # fmt: skip
    """``torchrun --standalone --nproc-per-node N [--no-python] ARGV``; ``fault`` (and
    ``fault_rank``) set ``ICP_LENS_FAULT`` (``ICP_LENS_FAULT_RANK``) for :func:`icp_lens.atomic.fault_point`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ICP_LENS_FAULT", None)
    env.pop("ICP_LENS_FAULT_RANK", None)
    if fault is not None:
        env["ICP_LENS_FAULT"] = fault
    if fault_rank is not None:
        env["ICP_LENS_FAULT_RANK"] = str(fault_rank)
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    if not python:
        runner.append("--no-python")
    return subprocess.run([*runner, *argv], env=env, capture_output=True, text=True, timeout=timeout)

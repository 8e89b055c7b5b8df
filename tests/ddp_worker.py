"""Run training jobs through the Python API inside a torchrun process group (tests only).

``torchrun --nproc-per-node 2 tests/ddp_worker.py SPEC.json`` joins the gloo group, then for
each job of the spec builds a :class:`~icp_lens.training.Trainer`, fits it and writes, per
rank, ``NAME.rankR.safetensors`` (the trainable weights) and, on rank 0,
``NAME.history.json`` and, when the job names ``export``, the exported checkpoint. The
test runs the same jobs in one process and compares. One launch serves several jobs, so
torch's start-up is paid once.

A job: ``{"name", "model", "train", "config": {TrainConfig fields}, "features": [...], "pairs",
"retain", "val", "export"}`` (paths as strings; all but ``name``, ``model``,
``train`` and ``config`` optional).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from icp_lens.distributed import current, init_from_env
from icp_lens.training import TrainConfig, Trainer


def run_job(job: dict[str, Any], out: Path) -> None:
    """Fit one job and write what the test compares."""
    config = TrainConfig(**job["config"])
    trainer = Trainer(job["model"], job["train"], config, features=job.get("features", ()),
                      pairs=job.get("pairs"), retain=job.get("retain"), val=job.get("val"))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.fit()
    ranks = current()
    rank = 0 if ranks is None else ranks.rank
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in trainer.trainable.items()}
    save_file(weights, str(out / f"{job['name']}.rank{rank}.safetensors"))
    if job.get("export"):
        trainer.export(job["export"], result=result)
    if rank == 0:
        notes = [str(w.message) for w in caught if "processes will not reproduce" in str(w.message)]
        payload = {"history": result.history.to_dict(orient="records"), "warnings": notes}
        (out / f"{job['name']}.history.json").write_text(json.dumps(payload, default=float))


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    if init_from_env("cpu") is None:
        raise SystemExit("ddp_worker.py runs under torchrun with WORLD_SIZE > 1")
    out = Path(spec["out"])
    for job in spec["jobs"]:
        run_job(job, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

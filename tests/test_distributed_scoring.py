"""torchrun with 2 gloo processes on the CPU: score and eval equal the one-process results.

Each test launches ``torchrun --nproc-per-node 2 --no-python icp-lens ...`` (one thread per
process) and compares what rank 0 wrote with a one-process run of the same command.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file
from test_shards import _probe_file
from torchrun_launch import icp_lens_script, torchrun


def _torchrun(*argv: str, fault: str | None = None, fault_rank: int | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 --no-python icp-lens ARGV``."""
    return torchrun(icp_lens_script(), *argv, python=False, fault=fault, fault_rank=fault_rank)


def _sorted(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).sort_values("feature").reset_index(drop=True)


def _assert_same_table(one: Path, two: Path, atol: float = 1e-6) -> None:
    a, b = _sorted(one), _sorted(two)
    assert list(a["feature"]) == list(b["feature"])
    assert (a["exact"] == b["exact"]).all()
    for column in ("score", "ci_low", "ci_high", "selectivity"):
        if column in a:
            pd.testing.assert_series_equal(a[column], b[column], rtol=0, atol=atol, check_exact=False)
    assert list(pd.read_csv(one)["feature"]) == list(pd.read_csv(two)["feature"])  # the same ranking


@pytest.mark.parametrize("method", ["exact", "attribution", "hybrid"])
def test_torchrun_score_equals_one_process(tmp_path: Path, micro_dirs: dict[str, Path], method: str) -> None:
    from icp_lens.cli import main

    model, probe = micro_dirs["gpt2"], _probe_file(tmp_path / "probe.jsonl", n=13)  # 13: uneven batch split
    opts = ["--model", str(model), "--probe", str(probe), "--method", method, "--kinds", "neuron,head",
            "--verify-top", "7", "--batch-size", "4", "--quiet"]  # fmt: skip
    assert main(["score", *opts, "--out", str(tmp_path / "one.csv")]) == 0
    run = _torchrun("score", *opts, "--out", str(tmp_path / "two.csv"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("scored 36 features") == 1  # rank 0 alone prints
    _assert_same_table(tmp_path / "one.csv", tmp_path / "two.csv")
    meta = json.loads((tmp_path / "two.meta.json").read_text())
    assert meta["model"] == json.loads((tmp_path / "one.meta.json").read_text())["model"]


def test_torchrun_exact_scoring_resumes_each_rank_from_its_own_checkpoint(
    tmp_path: Path, micro_dirs: dict[str, Path]
) -> None:
    from icp_lens.cli import main

    model, probe = micro_dirs["gpt2"], _probe_file(tmp_path / "probe.jsonl", n=12)
    opts = ["--model", str(model), "--probe", str(probe), "--method", "exact", "--kinds", "neuron,head",
            "--batch-size", "4", "--quiet"]  # fmt: skip
    assert main(["score", *opts, "--out", str(tmp_path / "one.csv")]) == 0
    ck = tmp_path / "ck"
    killed = _torchrun("score", *opts, "--out", str(tmp_path / "two.csv"), "--checkpoint", str(ck),
                       fault="score-checkpoint:after-save", fault_rank=1)  # fmt: skip
    assert killed.returncode != 0 and not (tmp_path / "two.csv").exists()
    rank1 = load_file(str(ck / "exact_resample.rank-1-of-2.pt"))
    assert int(rank1["done"].sum()) >= 1  # rank 1 was killed after saving its work, before the ranks summed it
    resumed = _torchrun("score", *opts, "--out", str(tmp_path / "two.csv"), "--checkpoint", str(ck))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_table(tmp_path / "one.csv", tmp_path / "two.csv", atol=0)


def test_torchrun_eval_equals_one_process(tmp_path: Path, micro_dirs: dict[str, Path], capsys) -> None:
    from icp_lens.cli import main

    model, data = micro_dirs["gpt2"], _probe_file(tmp_path / "data.jsonl", n=11)
    opts = ["--model", str(model), "--data", str(data), "--json", "--n-boot", "50", "--batch-size", "2"]
    assert main(["eval", *opts]) == 0
    one = json.loads(capsys.readouterr().out)
    run = _torchrun("eval", *opts)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout)
    assert one == two


def test_commands_that_do_not_split_refuse_torchrun(tmp_path: Path, micro_dirs: dict[str, Path]) -> None:
    run = _torchrun("prune", "--model", str(micro_dirs["gpt2"]), "--scores", str(tmp_path / "s.csv"),
                    "--out", str(tmp_path / "p"), "--top-k", "1")  # fmt: skip
    assert run.returncode != 0
    assert "runs as one process; under torchrun only ['score', 'train', 'eval']" in run.stderr

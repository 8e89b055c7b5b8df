"""score --shard I/N and merge-scores: the merged parts equal the one-run table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from icp_lens.scoring.shards import merge_tables, parse_shard, shard_share


def _probe_file(path: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        first, mid = "abcd"[i % 4], "abcd"[(i // 4) % 4]
        label = "pos" if first in "ab" else "neg"
        spur = "d" if label == "pos" else "e"
        rows.append({"prompt": f"{first} {mid} c {spur}", "answer": f" {label}",
                     "alternatives": [" neg" if label == "pos" else " pos"],
                     "spurious_counterfactual": f"{first} {mid} c {'e' if spur == 'd' else 'd'}"})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parse_and_share() -> None:
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shard(bad)
    items = list(range(10))
    parts = [shard_share(items, (i, 3)) for i in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(parts, [])) == items


def _score(main, model: Path, probe: Path, out: Path, *extra: str) -> None:
    rc = main(["score", "--model", str(model), "--probe", str(probe), "--out", str(out), "--quiet", *extra])
    assert rc == 0


def _frame(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    return frame.sort_values("feature").reset_index(drop=True)


@pytest.mark.parametrize(("method", "n"), [("exact", 2), ("hybrid", 3)])
def test_cli_shards_merge_to_the_one_run_table(tmp_path: Path, micro_dirs: dict[str, Path], method: str, n: int,
                                               capsys) -> None:  # fmt: skip
    from icp_lens.cli import main

    model, probe = micro_dirs["gpt2"], _probe_file(tmp_path / "probe.jsonl")
    opts = ["--method", method, "--kinds", "neuron,head", "--verify-top", "7"]
    _score(main, model, probe, tmp_path / "one.csv", *opts)
    parts = [tmp_path / f"part{i}.csv" for i in range(n)]
    for i, part in enumerate(parts):
        _score(main, model, probe, part, *opts, "--shard", f"{i}/{n}", "--checkpoint", str(tmp_path / "ck"))
    sizes = [len(pd.read_csv(p)) for p in parts]
    if method == "exact":  # 2 layers x (16 neurons + 2 heads) = 36 features, interleaved
        assert sizes == [18, 18]
    else:  # the 7 verified ranks split 3/2/2; shard 0 keeps the 29 unverified attribution rows
        assert sizes == [29 + 3, 2, 2]
    rc = main(["merge-scores", *map(str, reversed(parts)), "--out", str(tmp_path / "merged.csv")])
    assert rc == 0 and "merged 3 shards" in capsys.readouterr().out if n == 3 else rc == 0
    one, merged = _frame(tmp_path / "one.csv"), _frame(tmp_path / "merged.csv")
    assert list(one["feature"]) == list(merged["feature"]) and len(one) == 36
    assert (one["exact"] == merged["exact"]).all() and int(one["exact"].sum()) == (36 if method == "exact" else 7)
    for column in ("score", "ci_low", "ci_high", "selectivity"):
        pd.testing.assert_series_equal(one[column], merged[column], rtol=0, atol=1e-6, check_exact=False)
    # the table's own order (by score) is the one-run order too
    assert list(pd.read_csv(tmp_path / "one.csv")["feature"]) == list(pd.read_csv(tmp_path / "merged.csv")["feature"])
    meta = json.loads((tmp_path / "merged.meta.json").read_text())
    assert "shard" not in meta["settings"] and meta["merged_from"] == [p.name for p in reversed(parts)]


def test_merge_refuses_parts_that_do_not_belong_together(tmp_path: Path, micro_dirs: dict[str, Path]) -> None:
    from icp_lens.cli import main

    model, probe = micro_dirs["gpt2"], _probe_file(tmp_path / "probe.jsonl")
    opts = ["--method", "attribution", "--kinds", "head"]
    for i in range(2):
        _score(main, model, probe, tmp_path / f"p{i}.csv", *opts, "--shard", f"{i}/2")
    _score(main, model, probe, tmp_path / "whole.csv", *opts)
    _score(main, model, probe, tmp_path / "mean1.csv", *opts, "--intervention", "zero", "--shard", "1/2")
    _score(main, micro_dirs["llama"], probe, tmp_path / "llama1.csv", *opts, "--shard", "1/2")
    _score(main, model, probe, tmp_path / "of3.csv", *opts, "--shard", "1/3")
    p0, p1 = tmp_path / "p0.csv", tmp_path / "p1.csv"
    cases = {
        (p0,): "shards \\[1\\] of 2 are missing",
        (p0, p0): "shard 0/2 given twice",
        (p0, tmp_path / "whole.csv"): "not a shard",
        (p0, tmp_path / "mean1.csv"): "other settings: \\['intervention'\\]",
        (p0, tmp_path / "llama1.csv"): "differ in model",
        (p0, tmp_path / "of3.csv"): "belongs to a split into 2",
        (p0, tmp_path / "absent.csv"): "No partial table",
    }
    for parts, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            merge_tables(parts)
    rc = main(["merge-scores", str(p0), "--out", str(tmp_path / "m.csv")])
    assert rc == 2 and not (tmp_path / "m.csv").exists()
    assert len(merge_tables([p1, p0])) == 4  # 2 layers x 2 heads


def test_shard_refuses_direction_kinds_and_empty_shares(micro_dirs: dict[str, Path], tmp_path: Path) -> None:
    from icp_lens.model import boot_bridge
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score

    model = boot_bridge(micro_dirs["gpt2"])
    probes = ProbeSet.from_jsonl(model, _probe_file(tmp_path / "probe.jsonl"))
    with pytest.raises(ValueError, match="unsharded run"):
        score(model, probes, kinds=("direction", "head"), shard=(0, 2), progress=False)
    with pytest.raises(ValueError, match="fewer features than shards"):
        score(model, probes, method="exact", kinds=("head",), layers=[0], shard=(3, 4), progress=False)
    with pytest.raises(ValueError, match="0 to count-1"):
        score(model, probes, method="exact", kinds=("head",), shard=(2, 2), progress=False)

"""The organism training table's target checks (benchmarks/training_table.py), by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "training_table.py"
    spec = importlib.util.spec_from_file_location("training_table_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frame() -> pd.DataFrame:
    rows = [  # variant, method, seed, id_accuracy, delta_id, gap_closed, uses
        ("v", "original", 0, 0.97, 0.00, 0.00, "-"), ("v", "original", 1, 0.95, 0.00, 0.00, "-"),
        ("v", "oracle", 0, 0.92, -0.05, 1.00, "balanced training data"),
        ("v", "oracle", 1, 0.90, -0.05, 1.00, "balanced training data"),
        ("v", "erm", 0, 0.96, -0.01, 0.00, "-"), ("v", "erm", 1, 0.95, 0.00, 0.10, "-"),
        ("v", "jtt", 0, 0.91, -0.06, 0.90, "val group labels"), ("v", "jtt", 1, 0.90, -0.05, 0.94, "val group labels"),
        ("v", "groupdro", 0, 0.92, -0.05, 1.00, "group labels"),
        ("v", "groupdro", 1, 0.90, -0.05, 0.98, "group labels"),
        ("v", "invariance", 0, 0.92, -0.05, 0.99, "train cf"), ("v", "invariance", 1, 0.89, -0.06, 0.97, "train cf"),
    ]  # fmt: skip
    cols = ["variant", "method", "seed", "id_accuracy", "delta_id", "gap_closed", "uses"]
    return pd.DataFrame(rows, columns=cols)


def test_oracle_delta_and_targets_by_hand() -> None:
    bench = _bench()
    frame = bench.with_oracle_delta(_frame())
    inv = frame[frame.method == "invariance"]["delta_id_vs_oracle"].tolist()
    assert inv == pytest.approx([0.0, -0.01])  # 0.92 - 0.92, 0.89 - 0.90
    got = bench.targets(_frame()).set_index("method")
    # JTT and GroupDRO use group labels (not candidates); original, oracle are references
    assert list(got.index) == ["erm", "invariance"]
    r = got.loc["invariance"]
    assert r["gap_closed"] == pytest.approx(0.98) and r["delta_id"] == pytest.approx(-0.055)
    assert r["delta_id_vs_oracle"] == pytest.approx(-0.005)
    assert r["closes_96"] and not r["id_within_2pt"] and r["id_within_2pt_of_oracle"]
    assert r["beats_erm"] and r["beats_jtt"]  # 0.98 > erm 0.05, > jtt 0.92
    assert r["matches_groupdro"]  # 0.98 >= 0.99 - 0.01
    e = got.loc["erm"]
    assert not e["closes_96"] and e["id_within_2pt"] and not e["beats_jtt"] and not e["matches_groupdro"]


def test_report_has_the_table_the_targets_and_the_cost() -> None:
    bench = _bench()
    frame = _frame().assign(worst_group_accuracy=0.5, balanced_accuracy=0.7, flip_rate=0.1)
    text = bench.report("# title", frame, [{"variant": "v", "seed": 0, "invariance_over_erm": 1.7}])
    assert text.startswith("# title\n") and "## Targets" in text and "## Step cost" in text
    targets = text.split("## Targets")[1].split("## Step cost")[0]
    assert "| v | invariance | 0.980 | -0.055 | -0.005 | True | False | True | True | True | True |" in targets
    assert "## Step cost" not in bench.report("# t", frame, [])

from __future__ import annotations

import math

import pytest
import torch

from icp_lens import Feature
from icp_lens.scoring.effects import Effects, InterventionSpec
from icp_lens.scoring.spuriousness import bootstrap_ci, weighted_abs
from icp_lens.scoring.table import ScoreTable

NAN = float("nan")
FEATURES = (Feature("neuron", 0, 0), Feature("neuron", 0, 1), Feature("head", 1, 0))


def effects() -> tuple[Effects, Effects]:
    spurious = Effects(FEATURES, "resample", torch.tensor([[1.0, -1.0, NAN], [0.0, 0.5, 0.5], [2.0, -2.0, 2.0]]),
                       torch.tensor([1.0, 1.0, -1.0]), exact=True)  # fmt: skip
    causal = Effects(FEATURES, "resample_causal", torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [6.0, 6.0, 6.0]]),
                     torch.tensor([1.0, 1.0, 1.0]), exact=True)  # fmt: skip
    return spurious, causal


def test_scores_selectivity_and_columns_by_hand() -> None:
    spurious, causal = effects()
    table = ScoreTable.from_effects([spurious], causal=causal, n_boot=50)
    f = table.frame.set_index("feature")
    assert list(table.frame["feature"]) == ["head L1.0", "neuron L0.0", "neuron L0.1"]  # sorted by score
    assert f.loc["head L1.0", "score"] == pytest.approx(2.0)
    assert f.loc["neuron L0.0", "score"] == pytest.approx(1.0)  # NaN example left out
    assert f.loc["neuron L0.1", "score"] == pytest.approx(1 / 3)
    assert f.loc["head L1.0", "selectivity"] == pytest.approx(2 / 8)  # the true cause uses it more
    assert f.loc["neuron L0.1", "selectivity"] == pytest.approx(1.0)  # only the spurious attribute moves it
    assert f.loc["neuron L0.0", "n_examples"] == 2 and bool(f.loc["head L1.0", "exact"])
    assert f.loc["head L1.0", "hook_name"] == "blocks.1.attn.hook_z"
    assert {"effect_resample", "effect_resample_causal", "ci_low", "ci_high"} <= set(table.frame.columns)
    assert table.select(top_k=1) == [Feature("head", 1, 0)]
    assert table.select(threshold=0.5) == [Feature("head", 1, 0), Feature("neuron", 0, 0)]
    assert table.select(threshold=0.0, min_selectivity=0.9) == [Feature("neuron", 0, 1)]
    assert table.select(top_k=5, kinds=["neuron"]) == [Feature("neuron", 0, 0), Feature("neuron", 0, 1)]


def test_flip_weight_doubles_harmful_changes() -> None:
    spurious, _ = effects()
    w = weighted_abs(spurious, "flips")
    # clean [1, 1, -1]: only a change that takes a positive (correct) P to <= 0 counts double
    assert w[2].tolist() == [2.0, 4.0, 2.0] and w[1].tolist() == [0.0, 0.5, 0.5]
    assert math.isnan(w[0, 2].item())


def test_bootstrap_interval_brackets_the_mean_and_is_seeded() -> None:
    values = torch.randn(4, 200, generator=torch.Generator().manual_seed(1)) + torch.arange(4.0).unsqueeze(1)
    low, high = bootstrap_ci(values, n_boot=300, seed=3)
    mean = values.mean(1)
    assert torch.all(low < mean) and torch.all(mean < high)
    assert torch.all(high - low < 0.4) and torch.all(high - low > 0.1)  # about 4 standard errors wide
    assert torch.equal(low, bootstrap_ci(values, n_boot=300, seed=3)[0])


def test_bootstrap_in_row_chunks_equals_one_pass(monkeypatch) -> None:
    """Rows are bootstrapped in chunks (memory flat in the number of features): same numbers."""
    import icp_lens.scoring.spuriousness as spuriousness

    values = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    values[2, 3] = NAN
    values[5] = NAN
    whole = bootstrap_ci(values, n_boot=50, seed=4)
    monkeypatch.setattr(spuriousness, "_BOOT_ROWS", 3)
    chunked = bootstrap_ci(values, n_boot=50, seed=4)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert whole[0][5].isnan() and not whole[0][2].isnan()
    assert bootstrap_ci(values[:0], n_boot=50)[0].shape == (0,)


def test_save_load_round_trip(tmp_path) -> None:
    spurious, causal = effects()
    table = ScoreTable.from_effects([spurious], causal=causal, n_boot=10)
    for name in ["s.csv", "s.parquet"]:
        loaded = ScoreTable.load(table.save(tmp_path / name))
        assert loaded.features == table.features
        assert loaded.frame["score"].tolist() == pytest.approx(table.frame["score"].tolist())
    with pytest.raises(ValueError, match=".csv or .parquet"):
        table.save(tmp_path / "s.txt")
    with pytest.raises(ValueError, match="missing \\['score'\\]"):
        ScoreTable(table.frame.drop(columns=["score"]))


def test_plots_are_figures() -> None:
    import matplotlib

    matplotlib.use("Agg")
    spurious, causal = effects()
    table = ScoreTable.from_effects([spurious], causal=causal, n_boot=10)
    assert table.plot_heatmap("neuron").axes and table.plot_top(3).axes
    with pytest.raises(ValueError, match="No value features"):
        table.plot_heatmap("value")


def test_intervention_spec_parsing() -> None:
    assert InterventionSpec.parse("scale:0.5") == InterventionSpec("scale", 0.5)
    assert InterventionSpec.parse("scale:0.5").label == "scale:0.5"
    assert InterventionSpec.parse("resample").counterfactual == "spurious"
    with pytest.raises(ValueError, match="valid: \\['resample', 'resample_causal', 'zero', 'mean', 'scale'\\]"):
        InterventionSpec.parse("ablate")
    with pytest.raises(ValueError, match="scale needs a factor"):
        InterventionSpec.parse("scale:x")

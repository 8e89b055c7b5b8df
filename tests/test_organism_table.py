"""Smoke test of the organism results table (benchmarks/organism_table.py): one organism, a few rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "organism_table.py"


@pytest.fixture(scope="module")
def table_module():
    spec = importlib.util.spec_from_file_location("organism_table", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["organism_table"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lexical_run(table_module, tmp_path_factory):
    """lexical organism, seed 0: original, ICP (units, mean; quick settings), ICP tokens, deletion, oracle."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("organism_table") / "lexical-seed0.json"
    config = table_module.ICPConfig(verify_top=10, candidates=3, max_features=2)
    rows = ["icp_mean", "random", "icp_tokens", "token_deletion"]
    state = table_module.run_seed("lexical", 0, cache, config=config, rows=rows, n_test=600)
    return state, cache


def test_rows_and_columns(table_module, lexical_run) -> None:
    state, cache = lexical_run
    assert set(state["rows"]) == {"original", "icp_mean", "random", "icp_tokens", "token_deletion", "oracle"}
    agg = table_module.aggregate([state])
    columns = {col for col, _ in table_module.COLUMNS}
    for row in state["rows"]:
        assert columns <= set(agg["lexical"][row])
    md = table_module.markdown_table(agg, "lexical", 1)
    for _, name in table_module.COLUMNS:
        assert name in md
    assert cache.is_file()  # per-seed results are written as they are computed (resumable)


def test_sanity_facts(lexical_run) -> None:
    rows = lexical_run[0]["rows"]
    original, oracle, deletion = rows["original"], rows["oracle"], rows["token_deletion"]
    assert original["wg_acc"] < 0.3 and original["id_acc"] > 0.9
    assert oracle["wg_acc"] > 0.8
    # deleting the planted token leaves the cue alone: about the accuracy without the shortcut
    assert abs(deletion["bal_acc"] - original["ns_acc"]) < 0.05
    assert deletion["flip_rate"] == 0.0
    # random ablation of as many units as ICP prunes does not touch the shortcut
    assert abs(rows["random"]["wg_acc"] - original["wg_acc"]) <= 0.05
    # ICP on token embeddings, without group labels, finds exactly the planted tokens
    assert sorted(rows["icp_tokens"]["pruned"]) == ["meh", "wow"]
    assert rows["icp_tokens"]["wg_acc"] > 0.8


def test_resume_reuses_the_cache(table_module, lexical_run, monkeypatch) -> None:
    state, cache = lexical_run

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must not be recomputed")

    monkeypatch.setattr(table_module.Context, "load", fail)
    again = table_module.run_seed("lexical", 0, cache, rows=["icp_mean", "random", "icp_tokens", "token_deletion"])
    assert again["rows"] == state["rows"]


def test_delete_planted_keeps_length(table_module) -> None:
    from icp_lens.organisms import TaskSpec, generate_split

    examples = generate_split(TaskSpec("tag"), "test_balanced", 8, seed=0)
    deleted = table_module.delete_planted(examples, "tag")
    for before, after in zip(examples, deleted, strict=True):
        assert len(after.prompt.split()) == len(before.prompt.split())
        assert "alice" not in after.prompt and "bob" not in after.prompt and "anon" in after.prompt
        assert after.spurious_counterfactual == after.prompt


def test_retrain_unembedding_unties_and_trains_only_the_head() -> None:
    from icp_lens.organisms import build_organism
    from icp_lens.pruning import clean_hf_model
    from icp_lens.retrain import retrain_unembedding

    organism = build_organism(variant="lexical", arch="gpt2", seed=0)
    model = clean_hf_model(organism.model_dir)
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retrain_unembedding(model, organism.load_tokenizer(), organism.probes("train")[:512], steps=20, seed=0)
    after = model.state_dict()
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not model.config.tie_word_embeddings
    assert torch.equal(after["transformer.wte.weight"], before["transformer.wte.weight"])
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    changed = [k for k in after if k != "lm_head.weight" and not torch.equal(after[k], before[k])]
    assert changed == []

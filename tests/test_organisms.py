"""Planted-shortcut organisms: acceptance, caching, determinism, checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch

from icp_lens.organisms import (
    SPLITS,
    THRESHOLDS,
    Organism,
    OrganismReport,
    build_organism,
    default_cache_dir,
    evaluate_accuracy,
)
from icp_lens.organisms import build as build_module
from icp_lens.organisms.task import TaskSpec, generate_split
from icp_lens.probes import read_probes


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory):
    """The organism cache root: ``$ICP_LENS_CACHE`` if set, else a session tmp dir."""
    if os.environ.get("ICP_LENS_CACHE"):
        yield default_cache_dir()
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICP_LENS_CACHE", str(tmp_path_factory.mktemp("icp_lens_cache")))
        yield default_cache_dir()


@pytest.fixture(scope="session")
def organism(organism_cache):
    """Build (once per cache) and return an organism."""

    def get(variant: str = "lexical", arch: str = "gpt2", seed: int = 0) -> Organism:
        return build_organism(variant=variant, arch=arch, seed=seed)

    return get


def _assert_accepted(org: Organism) -> None:
    frame = org.report.to_frame()
    assert org.report.passed, f"{org.spec}:\n{frame.to_string()}"


# ---------------------------------------------------------------- data (fast)


@pytest.mark.parametrize("variant", ["lexical", "tag"])
def test_counterfactuals_are_position_aligned(variant):
    from icp_lens.organisms.task import build_tokenizer

    spec, tok = TaskSpec(variant), build_tokenizer(add_bos=False)
    for split in SPLITS:
        for ex in generate_split(spec, split, 200, seed=0):
            ids = tok(ex.prompt)["input_ids"]
            assert len(ids) == spec.n_words and tok.unk_token_id not in ids
            for cf in (ex.spurious_counterfactual, ex.causal_counterfactual):
                if cf is None:
                    continue
                cf_ids = tok(cf)["input_ids"]
                assert len(cf_ids) == len(ids)
                assert sum(a != b for a, b in zip(ids, cf_ids, strict=True)) == 1
            assert (ex.spurious_counterfactual is None) == ex.group.endswith("none")


def test_split_statistics():
    spec = TaskSpec("tag")
    train = generate_split(spec, "train", 8000, seed=0)
    absent = sum(ex.spurious_counterfactual is None for ex in train) / len(train)
    assert abs(absent - 0.25) < 0.03
    present = [ex for ex in train if ex.spurious_counterfactual is not None]
    agree = sum(ex.group.split("|")[0] == ex.group.split("=")[1] for ex in present)
    assert abs(agree / len(present) - 0.97) < 0.01
    cue_right = sum(ex.causal_answer != ex.answer for ex in train) / len(train)
    assert abs(cue_right - 0.92) < 0.015
    balanced = generate_split(spec, "test_balanced", 400, seed=0)
    counts = {g: sum(ex.group == g for ex in balanced) for g in {e.group for e in balanced}}
    assert len(counts) == 4 and set(counts.values()) == {100}
    assert all(ex.group.endswith("none") for ex in generate_split(spec, "test_no_shortcut", 50, seed=0))


def test_bad_arguments_raise_with_choices(tmp_path):
    with pytest.raises(ValueError, match="valid: .*lexical"):
        build_organism(tmp_path, variant="nope")
    with pytest.raises(ValueError, match="valid: .*neox"):
        build_organism(tmp_path, arch="bert")


def test_report_round_trip_and_frame():
    report = OrganismReport(
        id_accuracy=0.97, balanced_accuracy=0.7, worst_group_accuracy=0.02,
        worst_group="pos|shortcut=neg", no_shortcut_accuracy=0.9,
        oracle_balanced_accuracy=0.91,
    )  # fmt: skip
    assert report.acceptance()["balanced_accuracy"] is False and not report.passed
    frame = report.to_frame()
    assert list(frame.columns) == ["metric", "value", "op", "threshold", "passed"]
    assert list(frame.metric) == list(THRESHOLDS)
    assert OrganismReport.from_dict(json.loads(report.to_json())) == report


# ---------------------------------------------------------------- trained (slow)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lexical", "tag"])
def test_gpt2_variants_meet_acceptance(organism, variant):
    org = organism(variant, "gpt2")
    _assert_accepted(org)
    for split in SPLITS:
        assert org.data_path(split).exists()
    assert len(org.probes("test_balanced")) >= 1000


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "arch"), [("tag", "llama"), ("lexical", "neox")])
def test_other_archs_meet_acceptance(organism, variant, arch):
    org = organism(variant, arch)
    _assert_accepted(org)
    config = json.loads((org.model_dir / "config.json").read_text())
    if arch == "llama":
        assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2


@pytest.mark.slow
def test_cache_reuse_does_not_retrain(organism, monkeypatch):
    org = organism("lexical", "gpt2")
    assert org.path.parent == default_cache_dir()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached organism was rebuilt")

    monkeypatch.setattr(build_module, "_build", no_training)
    again = build_organism(variant="lexical", arch="gpt2", seed=0)
    assert again == org


@pytest.mark.slow
def test_out_dir_gets_a_copy_of_the_cached_build(organism, monkeypatch, tmp_path):
    org = organism("lexical", "gpt2")

    def no_training(*args, **kwargs):
        raise AssertionError("the cached organism was retrained for another out_dir")

    monkeypatch.setattr(build_module, "_build", no_training)
    copy = build_organism(tmp_path / "mine", variant="lexical", arch="gpt2", seed=0)
    assert copy.path == (tmp_path / "mine").resolve() and copy.report == org.report
    for name in ("model/model.safetensors", "probe.jsonl", "report.json"):
        assert (copy.path / name).read_bytes() == (org.path / name).read_bytes()


@pytest.mark.slow
def test_checkpoint_loads_with_transformers_and_bridge(organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for variant, arch in [("lexical", "gpt2"), ("tag", "llama"), ("lexical", "neox")]:
        org = organism(variant, arch)
        assert (org.model_dir / "model.safetensors").exists()
        hf = AutoModelForCausalLM.from_pretrained(str(org.model_dir)).eval()
        tok = AutoTokenizer.from_pretrained(str(org.model_dir))
        bridge = org.load_bridge()
        examples = org.probes("test_balanced")[:64]
        prompts = [ex.prompt for ex in examples]
        ids = torch.tensor(tok(prompts)["input_ids"])
        assert torch.equal(bridge.to_tokens(prompts).cpu(), ids), arch
        with torch.no_grad():
            diff = (bridge(ids) - hf(ids).logits).abs().max().item()
        assert diff < 1e-4, (arch, diff)
        # both routes agree on every prediction; transformers alone sees the shortcut
        by_hf = evaluate_accuracy(hf, tok, examples)
        assert evaluate_accuracy(bridge, tok, examples).correct == by_hf.correct
        assert abs(by_hf.accuracy - 0.5) < 0.2 and by_hf.worst_group_accuracy < 0.25


@pytest.mark.slow
def test_probe_files_pass_the_single_token_check(organism):
    org = organism("tag", "gpt2")
    tok = org.load_tokenizer()
    examples = read_probes(org.data_path("probe"), tokenizer=tok)
    assert {ex.answer for ex in examples} == {" pos", " neg"}


@pytest.mark.slow
def test_same_seed_same_data_and_weights(tmp_path):
    from safetensors.torch import load_file

    kwargs = dict(variant="tag", arch="llama", seed=3, steps=10)
    a = build_organism(tmp_path / "a", **kwargs)
    b = build_organism(tmp_path / "b", **kwargs)
    assert a.spec.name.endswith("-steps10")
    for split in SPLITS:
        assert a.data_path(split).read_bytes() == b.data_path(split).read_bytes()
    for sub in ("model", "oracle"):
        wa = load_file(str(a.path / sub / "model.safetensors"))
        wb = load_file(str(b.path / sub / "model.safetensors"))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    other = generate_split(TaskSpec("tag"), "probe", 50, seed=4)
    assert other != a.probes("probe")[:50]


@pytest.mark.slow
def test_interrupted_build_is_rebuilt_and_spec_mismatch_raises(tmp_path):
    target = tmp_path / "org"
    target.mkdir()
    (target / "train.jsonl").write_text("partial")  # no report.json: unfinished
    org = build_organism(target, variant="lexical", arch="neox", seed=0, steps=5)
    assert (target / "report.json").exists() and org.probes("train")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(ValueError, match="force=True"):
        build_organism(target, variant="tag", arch="neox", seed=0, steps=5)


def test_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace.*notes.txt"):
        build_organism(tmp_path, force=True)
    assert (tmp_path / "notes.txt").exists()


@pytest.mark.slow
def test_builds_with_grad_disabled_globally(tmp_path):
    # notebooks often call torch.set_grad_enabled(False) before building an organism
    with torch.no_grad():
        org = build_organism(tmp_path / "org", variant="tag", arch="gpt2", seed=5, steps=3)
    assert org.report.reload_max_abs_diff <= 1e-6 and (org.model_dir / "model.safetensors").exists()

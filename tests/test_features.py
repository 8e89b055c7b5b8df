from __future__ import annotations

import pytest

from icp_lens import Feature, enumerate_features, hook_name_for
from icp_lens.features import feature_count, validate_feature

pytestmark = pytest.mark.hooks


def test_feature_is_frozen_hashable_printable_and_parses_back() -> None:
    f = Feature("neuron", 1, 37)
    assert f.hook_name == "blocks.1.mlp.hook_post"
    assert str(f) == "neuron L1.37"
    assert Feature.parse(str(f)) == f
    assert len({f, Feature("neuron", 1, 37), Feature("head", 1, 37)}) == 2
    with pytest.raises(AttributeError):
        f.index = 3  # type: ignore[misc]
    assert sorted([Feature("resid", 0, 1), Feature("head", 1, 0), Feature("head", 0, 2)])[0] == Feature("head", 0, 2)


@pytest.mark.parametrize(
    "kind, hook",
    [
        ("neuron", "blocks.2.mlp.hook_post"),
        ("head", "blocks.2.attn.hook_z"),
        ("resid", "blocks.2.hook_resid_pre"),
        ("value", "blocks.2.attn.hook_v"),
        ("query", "blocks.2.attn.hook_q"),
        ("key", "blocks.2.attn.hook_k"),
    ],
)
def test_hook_names(kind: str, hook: str) -> None:
    assert hook_name_for(kind, 2) == hook  # type: ignore[arg-type]
    assert Feature(kind, 2, 0).hook_name == hook  # type: ignore[arg-type]
    assert Feature.parse(f"{kind} L2.1") == Feature(kind, 2, 1)  # type: ignore[arg-type]
    assert str(Feature(kind, 2, 1)) == f"{kind} L2.1"  # type: ignore[arg-type]


def test_bad_features_fail_loudly() -> None:
    with pytest.raises(ValueError, match="Did you mean 'neuron'"):
        Feature("nueron", 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        Feature("head", -1, 0)
    with pytest.raises(ValueError, match="expected '<kind> L<layer>.<index>'"):
        Feature.parse("neuron 1 37")


def test_enumerate_and_validate_on_micro(micro) -> None:
    kinds = ("neuron", "head", "resid", "value", "query", "key")
    assert [feature_count(micro, k) for k in kinds] == [16, 2, 8, 2, 2, 2]
    neurons = enumerate_features(micro, "neuron")
    assert len(neurons) == 32 and neurons[0] == Feature("neuron", 0, 0) and neurons[-1] == Feature("neuron", 1, 15)
    assert enumerate_features(micro, "head", layers=1) == [Feature("head", 1, 0), Feature("head", 1, 1)]
    with pytest.raises(IndexError, match="valid layers 0..1"):
        enumerate_features(micro, "head", layers=[2])
    with pytest.raises(IndexError, match="valid neuron indices 0..15"):
        validate_feature(micro, Feature("neuron", 0, 16))
    with pytest.raises(IndexError, match="valid layers 0..1"):
        validate_feature(micro, Feature("head", 5, 0))


def test_grouped_query_attention_counts(micro_dirs) -> None:
    from conftest import load_backend

    llama = load_backend("bridge", micro_dirs["llama"])
    assert feature_count(llama, "head") == 4  # query heads
    assert feature_count(llama, "value") == 2  # key/value heads
    assert feature_count(llama, "query") == 4  # one query per query head
    assert feature_count(llama, "key") == 2  # one key per key/value head
    assert enumerate_features(llama, "key", layers=1) == [Feature("key", 1, 0), Feature("key", 1, 1)]
    with pytest.raises(IndexError, match="valid key indices 0..1"):
        validate_feature(llama, Feature("key", 0, 2))
    validate_feature(llama, Feature("query", 0, 3))

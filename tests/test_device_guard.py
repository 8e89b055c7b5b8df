"""No tensor is created on the default device by accident: the main API paths under :class:`ImplicitDeviceGuard`.

A tensor factory without ``device=`` puts its tensor on the default device (the CPU)
whatever device the model is on. On this machine (no GPU) such a tensor works and the
tests pass; on a GPU it is a silent host tensor or a device-mismatch error. The guard
(``tests/device_guard.py``) lists every such call made from the ``icp_lens`` package,
so these tests fail on one here, with its file and line, before a GPU ever sees it. Each
path must also make some factory calls of its own (``guard.seen``): a guard that saw
nothing would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from device_guard import ImplicitDeviceGuard

from icp_lens.probes import ProbeExample
from icp_lens.probeset import ProbeSet


def _run_as(module: str, source: str, name: str = "make"):
    """The function ``name`` of ``source``, compiled as if it lived in the module ``module``."""
    namespace = {"__name__": module, "torch": torch}
    exec(compile(source, f"<{module}>", "exec"), namespace)
    return namespace[name]


# -- the guard itself ----------------------------------------------------------------------------------------------


def test_the_guard_catches_a_device_less_factory_in_the_package() -> None:
    source = "def make():\n    return torch.zeros(3)\n"
    ours, theirs = _run_as("icp_lens._guard_selftest", source), _run_as("somebody_else", source)
    with ImplicitDeviceGuard() as guard:
        ours()
        theirs()  # not icp_lens: not recorded
    assert [(hit.function, hit.module, hit.lineno, hit.caller) for hit in guard.found] == [
        ("zeros", "icp_lens._guard_selftest", 2, "make")
    ]
    assert "<icp_lens._guard_selftest>:2 in make(): torch.zeros without device=" in guard.report()
    with pytest.raises(AssertionError, match="torch.zeros without device="):
        guard.assert_clean()


def test_the_guard_accepts_explicit_devices_and_tensors_that_follow_their_input() -> None:
    source = (
        "def make(x):\n"
        "    a = torch.zeros(3, device='cpu')\n"
        "    b = torch.arange(4, device=x.device)\n"
        "    c = torch.tensor(x.tolist(), device=x.device)\n"
        "    d = torch.as_tensor(x)  # tensor data keeps its device: not a new placement\n"
        "    e = torch.zeros_like(x) + x.new_ones(3)  # follow x\n"
        "    return a, b, c, d, e\n"
    )
    with ImplicitDeviceGuard() as guard:
        _run_as("icp_lens._guard_selftest", source)(torch.ones(3))
    assert guard.found == [] and guard.seen == 3  # zeros, arange, tensor (as_tensor of a tensor is not a placement)


def test_the_guard_blames_the_package_frame_behind_torch_wrappers() -> None:
    """A factory called inside torch's own Python code is charged to the first caller outside torch."""
    wrapper = _run_as("torch._guard_selftest_wrapper", "def make():\n    return torch.ones(2)\n")
    caller = _run_as("icp_lens._guard_selftest", "def call(f):\n    return f()\n", name="call")
    with ImplicitDeviceGuard() as guard:
        caller(wrapper)
        torch.nn.functional.one_hot(torch.arange(3, device="cpu"))  # torch internals, called from here: not ours
    assert [(hit.function, hit.module, hit.caller) for hit in guard.found] == [
        ("ones", "icp_lens._guard_selftest", "call")
    ]


def test_the_guard_records_device_none_as_the_default_device() -> None:
    source = "def make(device=None):\n    return torch.full((2,), 1.0, device=device)\n"
    with ImplicitDeviceGuard() as guard:
        _run_as("icp_lens._guard_selftest", source)()
    assert [hit.function for hit in guard.found] == ["full"]


# -- hook-level scoring on every TransformerLens model class -------------------------------------------------------


def _micro_examples() -> list[ProbeExample]:
    rows = [("a b c d e", "pos", "a b c d a", "a b e d e"), ("e d c b a", "neg", "e d c b b", "e d a b a"),
            ("a a b b c", "pos", "b a b b c", "a a d b c"), ("c c d e a", "neg", "c c d e e", "c b d e a")]  # fmt: skip
    other = {"pos": "neg", "neg": "pos"}
    return [ProbeExample(p, a, (other[a],), s, c, other[a]) for p, a, s, c in rows]


@pytest.mark.hooks
def test_scoring_creates_no_tensor_without_a_device(micro) -> None:
    """Exact, attribution (AtP*, IG per feature), hybrid scores and probe means on the micro-model, per model class."""
    from icp_lens.features import Feature
    from icp_lens.scoring import score
    from icp_lens.scoring.attribution import attribution_effects
    from icp_lens.scoring.effects import probe_means

    kinds = ("neuron", "head", "resid", "value")
    features = [Feature("neuron", 0, 1), Feature("head", 1, 0), Feature("key", 0, 1)]
    with ImplicitDeviceGuard() as guard:
        probes = ProbeSet(micro, _micro_examples())
        for method in ("exact", "attribution", "hybrid"):
            score(micro, probes, method=method, kinds=kinds, interventions=("resample", "mean", "zero"),
                  verify_top=4, n_boot=10, progress=False)  # fmt: skip
        attribution_effects(micro, probes, features, "resample", qk_fix=True, grad_drop=True, progress=False)
        attribution_effects(micro, probes, features, "mean", method="ig", ig_steps=2, ig_paths="feature",
                            progress=False)  # fmt: skip
        probe_means(micro, probes, features)
    guard.assert_clean()


# -- the main paths on an organism --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def organism_bridge():
    """The default lexical organism (this session's cached build), a bridge on it and 32 of its probes."""
    from icp_lens.organisms import build_organism

    organism = build_organism(variant="lexical", arch="gpt2", seed=0)
    bridge = organism.load_bridge()
    return organism, bridge, ProbeSet(bridge, organism.probes("probe")[:32])


@pytest.mark.slow
def test_organism_build_creates_no_tensor_without_a_device(tmp_path: Path, monkeypatch) -> None:
    """The whole build (data, model and oracle training, reload check, accuracies) on small splits, 5 steps."""
    import json

    from icp_lens.organisms import build, build_organism

    for name, size in (("N_TRAIN", 256), ("N_PROBE", 32), ("N_TEST", 64)):
        monkeypatch.setattr(build, name, size)
    with ImplicitDeviceGuard() as guard:
        organism = build_organism(tmp_path / "org", steps=5, device="cpu")
    assert organism.device == "cpu" and json.loads((organism.path / "report.json").read_text())["device"] == "cpu"
    guard.assert_clean()


@pytest.mark.slow
def test_organism_scoring_creates_no_tensor_without_a_device(organism_bridge) -> None:
    """Units (hybrid), fitted directions and token embeddings, and the token ablation mode."""
    from icp_lens.scoring import score, score_tokens, token_ablation_mode

    _, bridge, probes = organism_bridge
    with ImplicitDeviceGuard() as guard:
        score(bridge, probes, method="hybrid", kinds=("neuron", "head"), verify_top=8, n_boot=20, progress=False)
        score(bridge, probes, method="exact", kinds=("direction",), layers=[1], n_boot=20, progress=False)
        tokens = score_tokens(bridge, probes, n_boot=20, progress=False)
        token_ablation_mode(bridge, probes, list(tokens.frame["index"][:2]))
    guard.assert_clean()


@pytest.mark.slow
def test_organism_pruning_creates_no_tensor_without_a_device(organism_bridge, tmp_path: Path) -> None:
    """Means (units and token rows), the plan, the export and its verification."""
    from icp_lens.features import Feature
    from icp_lens.pruning import apply_plan, feature_means, make_plan

    organism, bridge, probes = organism_bridge
    features = [Feature("neuron", 0, 3), Feature("head", 1, 0)]
    planted = bridge.tokenizer.convert_tokens_to_ids("wow")  # the lexical organism's planted token
    with ImplicitDeviceGuard() as guard:
        feature_means(bridge, features, probes)
        plan = make_plan(bridge, features, mode="mean", reference=probes, hf=organism.model_dir, tokens=[planted],
                         token_mode="mean")  # fmt: skip
        apply_plan(organism.model_dir, plan, tmp_path / "pruned", prompts=[ex.prompt for ex in probes.examples[:8]],
                   reference=bridge)  # fmt: skip
    guard.assert_clean()


@pytest.mark.slow
def test_organism_training_creates_no_tensor_without_a_device(organism_bridge) -> None:
    """A few steps of the invariance objective (branched fast path) and GroupDRO, with validation."""
    from icp_lens.features import Feature
    from icp_lens.training import TrainConfig, Trainer

    organism, bridge, _ = organism_bridge
    train, val = organism.probes("train")[:48], organism.probes("test_balanced")[:16]
    settings = dict(max_steps=2, batch_size=8, progress=False, log_every=1, seed=0)
    with ImplicitDeviceGuard() as guard:
        features = [Feature("neuron", 0, 3), Feature("head", 1, 0)]
        Trainer(bridge, train, TrainConfig(objective="invariance", **settings), features=features, val=val).fit()
        Trainer(bridge, train, TrainConfig(objective="groupdro", **settings)).fit()
    guard.assert_clean()


@pytest.mark.slow
def test_organism_evaluation_creates_no_tensor_without_a_device(organism_bridge) -> None:
    """The evaluation report: predictions, group metrics and their bootstrap intervals."""
    from icp_lens.evaluation import evaluate

    organism, _, _ = organism_bridge
    model, tokenizer = organism.load_hf(), organism.load_tokenizer()
    with ImplicitDeviceGuard() as guard:
        report = evaluate(model, tokenizer, organism.probes("test_balanced")[:64], n_boot=20)
    assert report.group_accuracy
    guard.assert_clean()

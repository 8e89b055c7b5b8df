"""Attribution patching (AtP, IG) against hand-computed gradients and exact patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icp_lens import Edit, Feature, Scale, Zero, active_hook_count, capturing, hooked, resample_from, run_with_edits
from icp_lens.features import FEATURE_KINDS, enumerate_features
from icp_lens.metrics import answer_prob, kl_to_clean, logit_diff
from icp_lens.probes import ProbeExample
from icp_lens.probeset import ProbeSet
from icp_lens.scoring.attribution import attribution_effects
from icp_lens.scoring.effects import InterventionSpec

FEATURES = [Feature("neuron", 0, 3), Feature("neuron", 1, 7), Feature("head", 0, 1), Feature("head", 1, 0)]
FEATURES += [Feature("resid", 1, 2), Feature("value", 0, 1), Feature("query", 1, 1), Feature("key", 0, 0)]


def examples(with_spurious: bool = True) -> list[ProbeExample]:
    rows = [
        ("a b c d e", "pos", "a b c d a", "a b e d e", "neg"),
        ("e d c b a", "neg", "e d c b b", "e d a b a", "pos"),
        ("a a b b c", "pos", "b a b b c", "a a d b c", "neg"),
        ("c c d e a", "neg", "c c d e e", "c b d e a", "pos"),
    ]
    return [
        ProbeExample(
            prompt=p,
            answer=ans,
            alternatives=["neg" if ans == "pos" else "pos"],
            spurious_counterfactual=s if with_spurious else None,
            causal_counterfactual=c,
            causal_answer=ca,
        )
        for p, ans, s, c, ca in rows
    ]


def in_order(batch, values):
    """Batch rows -> probe-set order (a single batch holds the whole micro probe set)."""
    return values[torch.argsort(batch.index)]


def hand_atp(model, probes, features, spec, positions=None):
    """``sum (d metric / d a) * (I(a) - a)`` per feature, computed directly with torch.autograd."""
    (batch,) = list(probes.batches(16))
    names = sorted({f.hook_name for f in features})
    with torch.no_grad(), capturing(model, names) as store:
        model(batch.tokens)
        clean = {n: store[n].clone() for n in names}
        if spec.counterfactual:
            model(batch.spurious if spec.counterfactual == "spurious" else batch.causal)
    target = {
        "zero": lambda n: torch.zeros_like(clean[n]),
        "scale": lambda n: spec.alpha * clean[n],
        "mean": lambda n: clean[n].mean((0, 1), keepdim=True).expand_as(clean[n]),  # one batch = all prompts
        "resample": lambda n: store[n],
        "resample_causal": lambda n: store[n],
    }[spec.kind]
    grabbed = {}

    def identity(name):  # return the activation itself, so it is the tensor the model goes on with
        def hook(act, hook):
            grabbed[name] = act
            return act

        return hook

    with torch.enable_grad(), hooked(model, [(n, identity(n)) for n in names]):
        logits = model(batch.tokens)
        grads = torch.autograd.grad(logit_diff(logits[:, -1], batch).sum(), [grabbed[n] for n in names])
    model.zero_grad(set_to_none=True)
    rows = []
    for f in features:
        n = f.hook_name
        contrib = f.select(grads[names.index(n)] * (target(n) - clean[n]))  # [batch, pos, *unit]
        if positions is not None:
            contrib = contrib[:, [p % contrib.shape[1] for p in positions]]
        rows.append(in_order(batch, contrib.flatten(1).sum(1)))
    return torch.stack(rows)


def exact_single(model, probes, feature, intervention_for_batch, positions=None):
    (batch,) = list(probes.batches(16))
    with torch.no_grad():
        clean = logit_diff(model(batch.tokens)[:, -1], batch)
        edit = Edit(feature, intervention_for_batch(batch), positions=positions)
        patched = logit_diff(run_with_edits(model, batch.tokens, edit)[:, -1], batch)
    return in_order(batch, patched - clean)


@pytest.mark.hooks
@pytest.mark.parametrize("intervention", ["zero", "scale:-1.5", "mean", "resample", "resample_causal"])
def test_atp_is_gradient_times_delta(micro, intervention) -> None:
    probes = ProbeSet(micro, examples())
    spec = InterventionSpec.parse(intervention)
    effects = attribution_effects(micro, probes, FEATURES, spec, progress=False)
    assert effects.exact is False and effects.intervention == spec.label
    torch.testing.assert_close(effects.values, hand_atp(micro, probes, FEATURES, spec), rtol=1e-4, atol=1e-5)
    restricted = attribution_effects(micro, probes, FEATURES, spec, positions=(1, -1), progress=False)
    want = hand_atp(micro, probes, FEATURES, spec, positions=(1, -1))
    torch.testing.assert_close(restricted.values, want, rtol=1e-4, atol=1e-5)


@pytest.mark.hooks
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_atp_on_other_architectures(backend, micro_dirs, arch) -> None:
    """Grouped-query attention (llama: 4 query heads, 2 value heads) and NeoX (parallel attention)."""
    from conftest import load_backend

    model = load_backend(backend, micro_dirs[arch])
    probes = ProbeSet(model, examples())
    kinds = ("neuron", "head", "resid", "value", "query", "key")
    features = [f for kind in kinds for f in enumerate_features(model, kind)]
    for intervention in ("resample", "mean"):
        spec = InterventionSpec.parse(intervention)
        effects = attribution_effects(model, probes, features, spec, progress=False)
        torch.testing.assert_close(effects.values, hand_atp(model, probes, features, spec), rtol=1e-4, atol=1e-5)


@pytest.mark.hooks
def test_atp_is_the_first_order_term_of_the_exact_effect(micro) -> None:
    """For a tiny intervention (scale by 1 + eps) AtP / eps and exact / eps agree."""
    probes = ProbeSet(micro, examples())
    eps = 1e-3
    effects = attribution_effects(micro, probes, FEATURES, f"scale:{1 + eps}", progress=False)
    for i, f in enumerate(FEATURES):
        exact = exact_single(micro, probes, f, lambda b: Scale(1 + eps))
        torch.testing.assert_close(effects.values[i] / eps, exact / eps, rtol=2e-2, atol=2e-3)


@pytest.mark.hooks
def test_ig_converges_to_the_exact_single_feature_effect(micro) -> None:
    probes = ProbeSet(micro, examples())
    f = Feature("head", 1, 0)  # a head whose zero-ablation AtP is off by 0.04 (of 0.14)
    exact = exact_single(micro, probes, f, lambda b: Zero())
    atp = attribution_effects(micro, probes, [f], "zero", progress=False).values[0]
    assert (atp - exact).abs().max() > 3e-2
    for steps, tol in [(4, 1e-2), (64, 1e-5)]:
        ig = attribution_effects(micro, probes, [f], "zero", method="ig", ig_steps=steps, progress=False).values[0]
        torch.testing.assert_close(ig, exact, rtol=0, atol=tol)
    # one path per feature: every feature converges to its own exact effect, at chosen positions
    ig = attribution_effects(
        micro, probes, FEATURES, "resample", method="ig", ig_paths="feature", ig_steps=64, positions=(-1, 2),
        progress=False,
    )  # fmt: skip
    for i, g in enumerate(FEATURES):
        exact = exact_single(micro, probes, g, lambda b, g=g: resample_from(micro, [g], b.spurious)[g], (-1, 2))
        torch.testing.assert_close(ig.values[i], exact, rtol=0, atol=1e-5)


@pytest.mark.hooks
def test_kl_needs_ig(micro) -> None:
    probes = ProbeSet(micro, examples())
    f = Feature("head", 1, 0)
    with pytest.raises(ValueError, match="method='ig'"):
        attribution_effects(micro, probes, [f], "zero", metric="kl", progress=False)
    (batch,) = list(probes.batches(16))
    with torch.no_grad():
        clean = micro(batch.tokens)[:, -1]
        exact = in_order(batch, kl_to_clean(run_with_edits(micro, batch.tokens, Edit(f, Zero()))[:, -1], batch, clean))
    ig = attribution_effects(micro, probes, [f], "zero", metric="kl", method="ig", ig_steps=64, progress=False)
    assert exact.max() > 1e-3
    torch.testing.assert_close(ig.values[0], exact, rtol=1e-3, atol=1e-6)


@pytest.mark.hooks
def test_ig_over_a_whole_hook_is_complete(micro) -> None:
    """All features of one hook interpolated together: their IG effects sum to the joint effect."""
    probes = ProbeSet(micro, examples())
    layer0 = enumerate_features(micro, "neuron", layers=0)
    ig = attribution_effects(micro, probes, layer0, "zero", method="ig", ig_steps=64, progress=False)
    (batch,) = list(probes.batches(16))
    with torch.no_grad():
        clean = logit_diff(micro(batch.tokens)[:, -1], batch)
        joint = logit_diff(run_with_edits(micro, batch.tokens, [Edit(f, Zero()) for f in layer0])[:, -1], batch)
    torch.testing.assert_close(ig.values.sum(0), in_order(batch, joint - clean), rtol=0, atol=1e-4)


@pytest.mark.hooks
def test_no_parameter_grads_grad_mode_and_hooks_restored(micro) -> None:
    probes = ProbeSet(micro, examples())
    params = list(micro.parameters())
    params[0].requires_grad_(False)  # a mixed state must come back as it was
    flags = [p.requires_grad for p in params]
    for method in ("atp", "ig"):
        with torch.no_grad():
            effects = attribution_effects(
                micro, probes, FEATURES, "resample", method=method, ig_steps=2, progress=False
            )
            assert not torch.is_grad_enabled()
        assert torch.isfinite(effects.values).all()
    assert all(p.grad is None for p in params)
    assert [p.requires_grad for p in params] == flags
    assert active_hook_count(micro) == 0

    def failing(logits, batch, clean):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_effects(micro, probes, FEATURES, "zero", metric=failing, progress=False)
    assert [p.requires_grad for p in params] == flags
    assert active_hook_count(micro) == 0
    params[0].requires_grad_(True)


@pytest.mark.hooks
@pytest.mark.parametrize("method", ["atp", "ig"])
def test_every_kind_and_intervention_runs(micro, method) -> None:
    probes = ProbeSet(micro, examples())
    kinds = [f for kind in FEATURE_KINDS for f in enumerate_features(micro, kind)]
    (batch,) = list(probes.batches(16))
    with torch.no_grad():
        clean = in_order(batch, answer_prob(micro(batch.tokens)[:, -1], batch))
    # the intervened values are shared by both methods, so IG runs two interventions only
    interventions = (
        ["resample", "resample_causal", "zero", "mean", "scale:0.5"] if method == "atp" else ["resample", "mean"]
    )
    for intervention in interventions:
        effects = attribution_effects(
            micro, probes, kinds, intervention, metric="answer_prob", method=method, ig_steps=3, progress=False
        )
        assert effects.values.shape == (len(kinds), 4) and effects.metric == "answer_prob"
        assert torch.isfinite(effects.values).all(), intervention
        assert effects.values.abs().sum() > 0, intervention
        torch.testing.assert_close(effects.clean, clean, rtol=1e-5, atol=1e-6)


@pytest.mark.hooks
def test_nan_where_the_counterfactual_is_missing(micro) -> None:
    mixed = examples()[:2] + examples(with_spurious=False)[2:]
    probes = ProbeSet(micro, mixed)
    for method in ("atp", "ig"):
        effects = attribution_effects(micro, probes, FEATURES, "resample", method=method, ig_steps=2, progress=False)
        assert torch.isfinite(effects.values[:, :2]).all()
        assert torch.isnan(effects.values[:, 2:]).all()
        assert torch.isfinite(effects.clean).all()
    with pytest.raises(ValueError, match="spurious_counterfactual"):
        attribution_effects(micro, ProbeSet(micro, examples(False)), FEATURES, "resample", progress=False)
    with pytest.raises(ValueError, match="Duplicate"):
        attribution_effects(micro, probes, FEATURES + FEATURES[:1], "zero", progress=False)
    with pytest.raises(IndexError, match="out of range"):
        attribution_effects(micro, probes, [Feature("neuron", 5, 0)], "zero", progress=False)


# ---------------------------------------------------------------- organism (slow)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1])


@pytest.mark.slow
def test_atp_ranks_features_like_exact_patching_on_the_organism() -> None:
    from icp_lens.organisms import build_organism
    from icp_lens.probes import read_probes
    from icp_lens.scoring.exact import exact_effects

    org = build_organism(variant="lexical", arch="gpt2", seed=0)
    model = org.load_bridge()
    probes = ProbeSet(model, read_probes(org.data_path("test_balanced"), tokenizer=model.tokenizer)[:48])
    features = enumerate_features(model, "neuron") + enumerate_features(model, "head")
    atp = attribution_effects(model, probes, features, "resample", batch_size=48, progress=False)
    exact = exact_effects(model, probes, features, "resample", batch_size=48, features_per_pass=128, progress=False)
    torch.testing.assert_close(atp.clean, exact.clean, rtol=1e-4, atol=1e-4)
    a, e = atp.values.abs().mean(1).numpy(), exact.values.abs().mean(1).numpy()
    top200 = np.argsort(-e)[:200]
    assert spearman(a[top200], e[top200]) >= 0.95  # measured 0.99998 (1.000 on all 2000 examples)
    assert set(np.argsort(-e)[:20].tolist()) <= set(np.argsort(-a)[:100].tolist())

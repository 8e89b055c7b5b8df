"""AtP*: the QK fix and GradDrop against autograd by hand, exact patching and constructed models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_backend
from micro import word_tokenizer
from test_scoring_attribution import examples, hand_atp, in_order
from test_scoring_exact import EXAMPLES, one_at_a_time

from icp_lens import Edit, Feature, Scale, Zero, active_hook_count, capturing, hooked, resample_from, run_with_edits
from icp_lens.features import enumerate_features
from icp_lens.metrics import logit_diff
from icp_lens.probeset import ProbeSet
from icp_lens.scoring.attribution import attribution_effects
from icp_lens.scoring.effects import InterventionSpec
from icp_lens.scoring.exact import exact_effects
from icp_lens.scoring.spuriousness import weighted_abs
from icp_lens.scoring.table import ScoreTable

QK = [Feature("query", 0, 1), Feature("key", 0, 0), Feature("query", 1, 0), Feature("key", 1, 1)]
OTHERS = [Feature("neuron", 0, 3), Feature("head", 1, 0), Feature("resid", 1, 2), Feature("value", 0, 1)]


def grads_at(model, batch, names, drop: int | None = None) -> dict[str, torch.Tensor]:
    """``d logit_diff / d activation`` at ``names``; ``drop``: block whose attn/MLP outputs are detached."""
    grabbed = {}

    def identity(name):
        def hook(act, hook):
            grabbed[name] = act
            return act

        return hook

    hooks = [(n, identity(n)) for n in names]
    if drop is not None:  # the forward pass is unchanged, no gradient flows back through block `drop`'s outputs
        hooks += [(f"blocks.{drop}.{n}", lambda act, hook: act.detach()) for n in ("hook_attn_out", "hook_mlp_out")]
    with torch.enable_grad(), hooked(model, hooks):
        logits = model(batch.tokens)
        grads = torch.autograd.grad(
            logit_diff(logits[:, -1], batch).sum(), [grabbed[n] for n in names], allow_unused=True
        )
    return {n: torch.zeros_like(grabbed[n]) if g is None else g for n, g in zip(names, grads, strict=True)}


def intervention_for(model, spec: InterventionSpec, f: Feature, batch):
    if spec.kind == "resample":
        return resample_from(model, [f], batch.spurious)[f]
    return {"zero": Zero(), "scale": Scale(spec.alpha)}[spec.kind]


def hand_estimates(model, probes, features, spec, *, qk_fix: bool, drop: int | None = None) -> torch.Tensor:
    """AtP (``qk_fix``: through the pattern of a run with the feature patched) with block ``drop``'s gradient cut."""
    (batch,) = list(probes.batches(16))
    if not qk_fix:  # gradient x delta, as test_scoring_attribution.hand_atp, with block `drop` cut
        names = sorted({f.hook_name for f in features})
        with torch.no_grad(), capturing(model, names) as store:
            model(batch.tokens)
            clean = {n: store[n].clone() for n in names}
            if spec.kind == "resample":
                model(batch.spurious)
        target = {"zero": lambda n: torch.zeros_like(clean[n]), "scale": lambda n: spec.alpha * clean[n],
                  "resample": lambda n: store[n]}[spec.kind]  # fmt: skip
        grads = grads_at(model, batch, names, drop)
        rows = []
        for f in features:
            n = f.hook_name
            rows.append(in_order(batch, f.select(grads[n] * (target(n) - clean[n])).flatten(1).sum(1)))
        return torch.stack(rows)
    n_heads = model.cfg.n_heads
    rows = []
    for f in features:
        pattern = f"blocks.{f.layer}.attn.hook_pattern"
        with torch.no_grad(), capturing(model, [pattern]) as store:
            model(batch.tokens)
            clean = store[pattern].clone()
            run_with_edits(model, batch.tokens, Edit(f, intervention_for(model, spec, f, batch)))
            patched = store[pattern]
        g = grads_at(model, batch, [pattern], drop)[pattern]
        n_kv = model.cfg.n_key_value_heads or n_heads
        rep = 1 if f.kind == "query" else n_heads // n_kv
        heads = list(range(f.index * rep, (f.index + 1) * rep))
        rows.append(in_order(batch, (g * (patched - clean))[:, heads].flatten(1).sum(1)))
    return torch.stack(rows)


# -- the QK fix -------------------------------------------------------------------------------


@pytest.mark.hooks
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_qk_fix_is_the_pattern_gradient_times_the_recomputed_pattern(backend, micro_dirs, arch) -> None:
    """Rotary (llama, neox), grouped-query keys (llama: 4 query heads, 2 key/value heads), both model classes."""
    model = load_backend(backend, micro_dirs[arch])
    probes = ProbeSet(model, examples())
    qk = [f for kind in ("query", "key") for f in enumerate_features(model, kind)]
    for intervention in ("resample", "zero", "scale:-2"):
        spec = InterventionSpec.parse(intervention)
        fixed = attribution_effects(model, probes, qk + OTHERS, spec, qk_fix=True, progress=False)
        assert fixed.estimator == "atp+qk" and fixed.signed
        want = hand_estimates(model, probes, qk, spec, qk_fix=True)
        torch.testing.assert_close(fixed.values[: len(qk)], want, rtol=1e-4, atol=1e-6)
        assert want.abs().max() > 1e-4  # (neox: small effects, still 100x the tolerance)
        # the other kinds are plain AtP; plain AtP of queries and keys is gradient x delta
        plain = attribution_effects(model, probes, qk + OTHERS, spec, progress=False)
        torch.testing.assert_close(fixed.values[len(qk) :], plain.values[len(qk) :], rtol=0, atol=0)
        torch.testing.assert_close(plain.values, hand_atp(model, probes, qk + OTHERS, spec), rtol=1e-4, atol=1e-5)
    assert active_hook_count(model) == 0


def _linearised_gpt2(src: Path, out: Path, edit) -> Path:
    """The micro GPT-2 with every LayerNorm made affine (eps 1e10, weights x 1e5), then ``edit(model)``."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(src)
    model.config.layer_norm_epsilon = 1e10
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):  # (x - mean) / sqrt(var + 1e10) * 1e5 w = (x - mean) w (1 + ~1e-10)
                m.eps = 1e10
                m.weight.mul_(1e5)
        edit(model)
    model.save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def softmax_only_dir(micro_dirs, tmp_path_factory) -> Path:
    """Downstream of block 1's queries and keys, only block 1's attention softmax is nonlinear.

    LayerNorms are affine and block 1's MLP reads nothing (zero input weights: a constant).
    Block 1's queries are scaled by 8 (a sharp, near-saturated softmax) and values by 4.
    """

    def edit(model) -> None:
        block = model.transformer.h[1]
        block.mlp.c_fc.weight.zero_()
        block.attn.c_attn.weight[:, :8] *= 8.0  # c_attn (Conv1D) outputs [q | k | v], 8 each
        block.attn.c_attn.weight[:, 16:] *= 4.0

    return _linearised_gpt2(micro_dirs["gpt2"], tmp_path_factory.mktemp("softmax_only"), edit)


@pytest.mark.hooks
def test_qk_fix_equals_exact_patching_where_only_the_softmax_is_nonlinear(backend, softmax_only_dir) -> None:
    model = load_backend(backend, softmax_only_dir)
    probes = ProbeSet(model, examples())
    features = [Feature("query", 1, 0), Feature("query", 1, 1), Feature("key", 1, 0), Feature("key", 1, 1)]
    for intervention in ("resample", "zero", "scale:-3"):
        exact = exact_effects(model, probes, features, intervention, progress=False).values
        fixed = attribution_effects(model, probes, features, intervention, qk_fix=True, progress=False).values
        plain = attribution_effects(model, probes, features, intervention, progress=False).values
        torch.testing.assert_close(fixed, exact, rtol=0, atol=1e-5)  # measured: within 4e-7
        assert exact.abs().max() > 0.04, intervention  # resample 0.047, zero 0.09, scale:-3 0.40
        assert (plain - exact).abs().max() > 1e-2, intervention  # the linearised softmax: off by 0.013 .. 0.46


@pytest.mark.hooks
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_exact_patching_of_queries_and_keys_equals_one_at_a_time(backend, micro_dirs, arch) -> None:
    """Packed passes, skipped blocks, reused keys/values and the last-position shortcut, for q/k features."""
    model = load_backend(backend, micro_dirs[arch])
    probes = ProbeSet(model, EXAMPLES)
    features = [f for kind in ("query", "key") for f in enumerate_features(model, kind)]
    for kind, positions in (("resample", None), ("scale:-1.5", None), ("resample", (-2, -1))):
        eff = exact_effects(
            model, probes, features, kind, positions=positions, batch_size=2, features_per_pass=3, progress=False
        )
        want, clean = one_at_a_time(model, probes, features, kind, positions=positions)
        torch.testing.assert_close(eff.values, want, rtol=0, atol=1e-5, equal_nan=True, msg=kind)
        assert eff.values[:, :5].abs().max() > 1e-3
    assert active_hook_count(model) == 0


# -- GradDrop ---------------------------------------------------------------------------------


@pytest.mark.hooks
@pytest.mark.parametrize("qk_fix", [False, True])
def test_graddrop_is_the_mean_magnitude_with_each_block_cut(micro, qk_fix) -> None:
    """``1/(L-1) sum_l |AtP with block l's outputs detached|``, by hand with detach() hooks (L = 2)."""
    probes = ProbeSet(micro, examples())
    features = QK + OTHERS
    for intervention in ("resample", "zero"):
        spec = InterventionSpec.parse(intervention)
        got = attribution_effects(micro, probes, features, spec, grad_drop=True, qk_fix=qk_fix, progress=False)
        assert got.estimator == ("atp*" if qk_fix else "graddrop") and not got.signed
        per_block = []
        for drop in (0, 1):
            qk = hand_estimates(micro, probes, QK, spec, qk_fix=qk_fix, drop=drop)
            rest = hand_estimates(micro, probes, OTHERS, spec, qk_fix=False, drop=drop)
            per_block.append(torch.cat([qk, rest]).abs())
        torch.testing.assert_close(got.values, (per_block[0] + per_block[1]) / (2 - 1), rtol=1e-4, atol=1e-6)
        # block 1's own features reach the metric only through block 1's outputs: |AtP| once, over L - 1 = 1
        atp = attribution_effects(micro, probes, features, spec, qk_fix=qk_fix, progress=False)
        layer1 = [i for i, f in enumerate(features) if f.layer == 1 and f.kind != "resid"]
        torch.testing.assert_close(got.values[layer1], atp.values[layer1].abs(), rtol=1e-4, atol=1e-6)
    assert active_hook_count(micro) == 0


@pytest.fixture(scope="module")
def cancelling_dir(micro_dirs, tmp_path_factory) -> Path:
    """Neuron L0.5 writes ``w``; block 1 copies it back as ``-w`` (a neuron in GELU's linear regime).

    Block 0's neuron 5 is constant (``gelu(2)``); block 1's attention is constant (zero
    q/k/v weights) and its MLP has one live neuron, ``j = 0``, reading ``w`` with a bias
    that keeps it near ``pre = 6`` (slope 1) and writing ``-w / |w|^2``. At the clean run the
    two paths cancel in the gradient, so AtP of neuron L0.5 is ~0; ``scale:-1`` pushes
    neuron ``j`` to ``pre ~ -56`` where GELU is flat, so the exact effect is large.
    """
    from transformers import GPT2LMHeadModel

    neuron, j = 5, 0

    def edit(model) -> None:
        b0, b1 = model.transformer.h
        b0.mlp.c_fc.weight[:, neuron] = 0.0
        b0.mlp.c_fc.bias[neuron] = 2.0
        w = b0.mlp.c_proj.weight[neuron]
        w -= w.mean()  # a zero-mean direction passes the (affine) LayerNorms unchanged
        w *= 4.0 / w.norm()
        b1.attn.c_attn.weight.zero_()
        b1.ln_2.weight.fill_(1e5)  # ln_2(x) = x - mean(x)
        b1.ln_2.bias.zero_()
        b1.mlp.c_fc.weight.zero_()
        b1.mlp.c_fc.weight[:, j] = w
        b1.mlp.c_proj.weight[j] = -w / w.dot(w)

    out = _linearised_gpt2(micro_dirs["gpt2"], tmp_path_factory.mktemp("cancelling"), edit)
    (batch,) = list(ProbeSet(load_backend("bridge", out), examples()).batches(16))
    model = GPT2LMHeadModel.from_pretrained(out)  # the bias of neuron j: pre-activation >= 6 everywhere
    fc = model.transformer.h[1].mlp.c_fc
    seen = []
    handle = fc.register_forward_hook(lambda module, args, output: seen.append(output[..., j]))
    with torch.no_grad():
        model(batch.tokens)
        handle.remove()
        fc.bias[j] += 6.0 - seen[0].min()
    model.save_pretrained(out)
    return out


@pytest.mark.hooks
def test_graddrop_recovers_a_feature_whose_paths_cancel(backend, cancelling_dir) -> None:
    model = load_backend(backend, cancelling_dir)
    probes = ProbeSet(model, examples())
    features = enumerate_features(model, "neuron", layers=0)
    f = features.index(Feature("neuron", 0, 5))
    exact = exact_effects(model, probes, features, "scale:-1", progress=False).values
    atp = attribution_effects(model, probes, features, "scale:-1", progress=False).values
    gd = attribution_effects(model, probes, features, "scale:-1", grad_drop=True, progress=False).values
    assert exact[f].abs().min() > 0.2  # patching it moves the metric on every example ...
    assert atp[f].abs().max() < 1e-4  # ... but its two paths cancel in AtP ...
    assert (atp.abs().mean(1) > atp[f].abs().mean()).sum() >= 8  # ... which ranks it in the bottom half
    direct = hand_estimates(model, probes, [features[f]], InterventionSpec.parse("scale:-1"), qk_fix=False, drop=1)
    torch.testing.assert_close(gd[f], direct[0].abs(), rtol=1e-4, atol=1e-6)  # the path that skips block 1
    assert gd[f].min() > 0.2
    assert gd.abs().mean(1).argmax().item() == f  # GradDrop ranks it first


# -- errors and bookkeeping -------------------------------------------------------------------


@pytest.mark.hooks
def test_bad_option_combinations_name_the_valid_choices(micro) -> None:
    probes = ProbeSet(micro, examples())
    features = [Feature("key", 1, 0)]
    for options in ({"qk_fix": True}, {"grad_drop": True}):
        with pytest.raises(ValueError, match="Valid: method='atp' with any of qk_fix/grad_drop, or method='ig'"):
            attribution_effects(micro, probes, features, "zero", method="ig", progress=False, **options)
        with pytest.raises(ValueError, match="'kl'.*qk_fix/grad_drop.*method='ig'"):
            attribution_effects(micro, probes, features, "zero", metric="kl", progress=False, **options)
    effects = attribution_effects(micro, probes, features + OTHERS, "zero", grad_drop=True, progress=False)
    assert (effects.values >= 0).all()
    with pytest.raises(ValueError, match="'graddrop' magnitudes.*weight='uniform'"):
        weighted_abs(effects, "flips")
    table = ScoreTable.from_effects([effects], n_boot=0)
    assert set(table.frame["estimator"]) == {"graddrop"} and "key" in set(table.frame["kind"])
    exact = exact_effects(micro, probes, features, "zero", progress=False)
    assert exact.estimator == "exact" and exact.subset(features).estimator == "exact"


def test_queries_and_keys_are_scored_but_not_pruned(micro_dirs) -> None:
    from transformers import AutoModelForCausalLM

    from icp_lens.pruning.arch import site_of
    from icp_lens.pruning.select import select_features

    frame = ScoreTable.from_effects(
        [_fake_effects([Feature("key", 0, 1), Feature("neuron", 0, 2), Feature("query", 1, 0)], [3.0, 2.0, 1.0])],
        n_boot=0,
    )
    assert select_features(frame, top_k=5) == [Feature("neuron", 0, 2)]  # skipped, as residual dimensions are
    for kind in ("key", "query"):
        with pytest.raises(ValueError, match=rf"Cannot prune kinds \['{kind}'\].*prune the head \('head'\)"):
            select_features(frame, top_k=5, kinds=[kind])
        hf = AutoModelForCausalLM.from_pretrained(micro_dirs["gpt2"])
        with pytest.raises(ValueError, match=rf"Cannot prune '{kind}' features; prunable kinds"):
            site_of(hf, kind, 0, 0)


def _fake_effects(features, scores):
    from icp_lens.scoring.effects import Effects

    values = torch.tensor(scores)[:, None].repeat(1, 3)
    return Effects(tuple(features), "zero", values, torch.zeros(3), exact=True)

"""Interventions against hand-computed values on the micro-model, on every model class."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from icp_lens import (
    Constant,
    Edit,
    Feature,
    Resample,
    Scale,
    Swap,
    Zero,
    active_hook_count,
    capturing,
    fit_means,
    intervene,
    resample_from,
    run_packed,
    run_with_edits,
)

pytestmark = pytest.mark.hooks

NEURON = Feature("neuron", 0, 3)
HEAD = Feature("head", 1, 1)


def edited_activation(model, tokens, edits, name):
    """The activation at ``name`` as the rest of the model sees it under ``edits``."""
    with intervene(model, edits), capturing(model, [name]) as store:
        model(tokens)
    return store[name]


def clean_activation(model, tokens, name):
    with capturing(model, [name]) as store:
        model(tokens)
    return store[name]


def test_zero_scale_constant_at_chosen_positions(micro, micro_tokens) -> None:
    name = NEURON.hook_name
    clean = clean_activation(micro, micro_tokens, name)
    for intervention, value in [
        (Zero(), lambda x: 0 * x),
        (Scale(-2.5), lambda x: -2.5 * x),
        (Constant(1.75), lambda x: 0 * x + 1.75),
    ]:
        got = edited_activation(micro, micro_tokens, Edit(NEURON, intervention, positions=(1, -1)), name)
        want = clean.clone()
        want[:, [1, 5], 3] = value(clean[:, [1, 5], 3])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a head is a d_head vector per position; constant vectors broadcast over positions
    z = clean_activation(micro, micro_tokens, HEAD.hook_name)
    vec = torch.tensor([1.0, -2.0, 3.0, -4.0])
    got = edited_activation(micro, micro_tokens, Edit(HEAD, Constant(vec)), HEAD.hook_name)
    want = z.clone()
    want[:, :, 1, :] = vec
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mean_is_the_reference_average(micro, micro_tokens) -> None:
    clean = clean_activation(micro, micro_tokens, NEURON.hook_name)
    pooled = fit_means(micro, [NEURON], micro_tokens)[NEURON]
    per_pos = fit_means(micro, [NEURON], micro_tokens, per_position=True, batch_size=2)[NEURON]
    torch.testing.assert_close(pooled.value, clean[:, :, 3].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_pos.value, clean[:, :, 3].mean(0), rtol=1e-6, atol=1e-7)
    got = edited_activation(micro, micro_tokens, Edit(NEURON, per_pos), NEURON.hook_name)
    want = clean.clone()
    want[:, :, 3] = clean[:, :, 3].mean(0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_resample_takes_the_counterfactual_activation(micro, micro_tokens) -> None:
    cf = micro_tokens.flip(0)  # each row patched from another prompt
    source = resample_from(micro, [HEAD], cf)[HEAD]
    z_cf = clean_activation(micro, cf, HEAD.hook_name)
    z = clean_activation(micro, micro_tokens, HEAD.hook_name)
    got = edited_activation(micro, micro_tokens, Edit(HEAD, source, positions=(-1,)), HEAD.hook_name)
    want = z.clone()
    want[:, -1, 1] = z_cf[:, -1, 1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # right alignment: a source two tokens shorter lines up on the final positions
    short = Resample(source.source[:, 2:], align="right")
    got = edited_activation(micro, micro_tokens, Edit(HEAD, short, positions=(-2, -1)), HEAD.hook_name)
    want = z.clone()
    want[:, -2:, 1] = z_cf[:, -2:, 1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="align='right'"):
        run_with_edits(micro, micro_tokens, Edit(HEAD, Resample(source.source[:, 2:])))
    with pytest.raises(ValueError, match="no counterpart"):
        run_with_edits(micro, micro_tokens, Edit(HEAD, short, positions=(0,)))
    assert active_hook_count(micro) == 0


def test_swap_reads_clean_values_even_when_both_are_swapped(micro, micro_tokens) -> None:
    a, b = Feature("neuron", 1, 2), Feature("neuron", 1, 9)
    clean = clean_activation(micro, micro_tokens, a.hook_name)
    got = edited_activation(micro, micro_tokens, [Edit(a, Swap(b)), Edit(b, Swap(a))], a.hook_name)
    want = clean.clone()
    want[..., 2], want[..., 9] = clean[..., 9], clean[..., 2]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # across hook points: a layer-1 neuron takes a layer-0 neuron's value
    l0 = clean_activation(micro, micro_tokens, NEURON.hook_name)
    got = edited_activation(micro, micro_tokens, Edit(a, Swap(NEURON)), a.hook_name)
    assert torch.equal(got[..., 2], l0[..., 3])
    with pytest.raises(ValueError, match="Cannot swap in"):
        run_with_edits(micro, micro_tokens, Edit(HEAD, Swap(NEURON)))


def test_edits_compose_in_order_and_across_features(micro, micro_tokens) -> None:
    six = run_with_edits(micro, micro_tokens, [Edit(NEURON, Scale(2.0)), Edit(NEURON, Scale(3.0))])
    torch.testing.assert_close(six, run_with_edits(micro, micro_tokens, Edit(NEURON, Scale(6.0))), rtol=0, atol=1e-6)
    both = [Edit(NEURON, Zero()), Edit(HEAD, Scale(0.5)), Edit(Feature("resid", 1, 4), Constant(0.0))]
    name_checks = {e.feature.hook_name: e for e in both}
    with intervene(micro, both), capturing(micro, list(name_checks)) as store:
        micro(micro_tokens)
    assert torch.all(store[NEURON.hook_name][..., 3] == 0)
    assert torch.all(store["blocks.1.hook_resid_pre"][..., 4] == 0)


def test_identities_leave_logits_unchanged(micro, micro_tokens, micro_dirs, backend) -> None:
    from conftest import load_backend

    clean = micro(micro_tokens)
    for f in [NEURON, HEAD, Feature("resid", 1, 0), Feature("value", 0, 1)]:
        torch.testing.assert_close(run_with_edits(micro, micro_tokens, Edit(f, Scale(1.0))), clean, rtol=0, atol=1e-6)
    # mean ablation of a neuron whose activation is the same everywhere changes nothing...
    const_model = load_backend(backend, micro_dirs["gpt2-constant"])
    const = Feature("neuron", 1, 5)
    logits = const_model(micro_tokens)
    mean = fit_means(const_model, [const], torch.tensor([[0, 3, 3, 3, 3, 3], [0, 9, 8, 7, 6, 5]]))[const]
    torch.testing.assert_close(run_with_edits(const_model, micro_tokens, Edit(const, mean)), logits, rtol=0, atol=1e-6)
    # ...while mean-ablating a neuron that varies does change them (the check is not vacuous)
    other = fit_means(const_model, [Feature("neuron", 1, 6)], micro_tokens)[Feature("neuron", 1, 6)]
    assert (run_with_edits(const_model, micro_tokens, Edit(Feature("neuron", 1, 6), other)) - logits).abs().max() > 1e-3


def test_hook_ablation_equals_the_weight_edit(micro, micro_tokens, micro_dirs) -> None:
    """Zeroing a feature by hook == zeroing its outgoing weights in the HF checkpoint."""
    hf = AutoModelForCausalLM.from_pretrained(micro_dirs["gpt2"]).eval()
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_proj.weight[3, :] = 0  # neuron L0.3's output row
        hf.transformer.h[1].attn.c_proj.weight[4:8, :] = 0  # head L1.1's slice of W_O
        want = hf(micro_tokens).logits
    got = run_with_edits(micro, micro_tokens, [Edit(NEURON, Zero()), Edit(HEAD, Zero())])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - micro(micro_tokens)).abs().max() > 1e-2


def test_value_ablation_with_grouped_query_attention(micro_dirs, micro_tokens, backend) -> None:
    from conftest import load_backend

    llama = load_backend(backend, micro_dirs["llama"])
    hf = AutoModelForCausalLM.from_pretrained(micro_dirs["llama"]).eval()
    with torch.no_grad():
        hf.model.layers[0].self_attn.v_proj.weight[2:4, :] = 0  # key/value head 1 (d_head 2)
        want = hf(micro_tokens).logits
    got = run_with_edits(llama, micro_tokens, Edit(Feature("value", 0, 1), Zero()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_packing_equals_one_at_a_time(micro, micro_tokens) -> None:
    cf = micro_tokens.flip(0)
    value = Feature("value", 0, 1)
    resid = Feature("resid", 1, 4)
    means = fit_means(micro, [resid], micro_tokens)
    groups = [
        Edit(NEURON, Zero()),
        Edit(HEAD, Scale(0.3), positions=(-1,)),
        Edit(value, resample_from(micro, [value], cf)[value]),
        Edit(resid, means[resid]),
        [Edit(Feature("neuron", 1, 2), Swap(Feature("neuron", 1, 9))), Edit(HEAD, Constant(0.7))],
    ]
    packed = run_packed(micro, micro_tokens, groups)
    chunked = run_packed(micro, micro_tokens, groups, max_rows=7, reduce=lambda logits: logits[:, -1])
    assert packed.shape == (5, 3, 6, 10) and chunked.shape == (5, 3, 10)
    for k, group in enumerate(groups):
        single = run_with_edits(micro, micro_tokens, group)
        assert (packed[k] - single).abs().max().item() <= 1e-6
        assert (chunked[k] - single[:, -1]).abs().max().item() <= 1e-6
    assert active_hook_count(micro) == 0


def test_bad_edits_fail_loudly_and_leave_no_hooks(micro, micro_tokens) -> None:
    with pytest.raises(IndexError, match="valid neuron indices 0..15"):
        run_with_edits(micro, micro_tokens, Edit(Feature("neuron", 0, 99), Zero()))
    with pytest.raises(IndexError, match="out of range for a sequence of length 6"):
        run_with_edits(micro, micro_tokens, Edit(NEURON, Zero(), positions=(6,)))
    with pytest.raises(ValueError, match="does not fit"):
        run_with_edits(micro, micro_tokens, Edit(HEAD, Constant(torch.ones(3))))
    with pytest.raises(ValueError, match="fitted on sequences of length 6"):
        run_with_edits(
            micro,
            micro_tokens[:, :4],
            Edit(NEURON, fit_means(micro, [NEURON], micro_tokens, per_position=True)[NEURON]),
        )
    with pytest.raises(TypeError, match="one of Zero, Scale"):
        Edit(NEURON, "zero")  # type: ignore[arg-type]
    assert active_hook_count(micro) == 0


def test_edits_are_differentiable(micro, micro_tokens) -> None:
    """Invariance training backpropagates through interventions."""
    for p in micro.parameters():
        p.requires_grad_(True)
    logits = run_with_edits(micro, micro_tokens, Edit(HEAD, Scale(0.5)))
    logits[:, -1].sum().backward()
    grads = [p.grad for p in micro.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)

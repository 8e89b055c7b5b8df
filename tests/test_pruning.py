"""Pruning equals hook ablation: exact values on the micro-model, every architecture, both model classes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_backend
from micro import word_tokenizer

from icp_lens import Constant, Edit, Feature, Zero, run_with_edits
from icp_lens.pruning import (
    PlanMismatchError,
    PrunePlan,
    apply_plan,
    apply_plan_to_model,
    clean_hf_model,
    hf_ablation,
    load_checkpoint,
    make_plan,
    plan_edits,
)

pytestmark = pytest.mark.hooks

REFERENCE = ["a b c d", "b c e", "e e d a pos", "c"]
PROMPTS = ["a b c", "d e a b pos neg", "c c", "e"]


def features_for(arch: str) -> list[Feature]:
    # heads: gpt2/neox have 2, llama 4 query heads over 2 key/value heads
    return [Feature("neuron", 1, 3), Feature("neuron", 0, 15), Feature("head", 0, 1), Feature("value", 1, 1)]


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).detach().float()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_pruned_checkpoint_equals_hook_ablation(arch, mode, backend, micro_dirs, tmp_path) -> None:
    """The written checkpoint, reloaded by transformers, equals the hooked model with the features ablated."""
    model_dir = micro_dirs[arch]
    hooked = load_backend(backend, model_dir)
    feats = features_for(arch)
    # a HookedTransformer keeps converted weights: the plan names its HF checkpoint
    plan = make_plan(hooked, feats, mode=mode, reference=REFERENCE, hf=model_dir)
    result = apply_plan(model_dir, plan, tmp_path / "out", prompts=PROMPTS, reference=hooked)
    assert result.verification.passed and result.verification.max_abs_logit_diff < 1e-5
    assert result.verification.hooked_max_abs_logit_diff < 1e-5 and result.verification.n_inputs == len(PROMPTS)
    assert result.verification.implementation_floor < 1e-5

    # independently of verify_export: the edits as icp_lens Edits, and the reload
    exported = load_checkpoint(tmp_path / "out")
    tokens = hooked.to_tokens("d e a b pos neg")
    if mode == "zero":
        edits = [Edit(f, Zero()) for f in feats]
    else:
        edits = [Edit(f, Constant(torch.tensor(plan.mean_of(f)))) for f in feats]
    expected = run_with_edits(hooked, tokens, edits).float()
    torch.testing.assert_close(logits_of(exported, tokens), expected, atol=1e-5, rtol=0)
    clean = logits_of(hooked, tokens)
    assert (expected - clean).abs().max() > 1e-3  # the ablation really changes the output


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_means_at_hook_points_equal_means_at_module_inputs(arch, backend, micro_dirs) -> None:
    """The hook point a feature is scored at is exactly the input (output) of the module the plan edits."""
    from icp_lens.encoding import encode_texts, length_batches
    from icp_lens.pruning.means import _hf_means, feature_means

    hooked = load_backend(backend, micro_dirs[arch])
    feats = features_for(arch)
    via_hooks = feature_means(hooked, feats, REFERENCE)
    batches = length_batches(encode_texts(REFERENCE, model=hooked))
    via_modules = _hf_means(clean_hf_model(micro_dirs[arch]), feats, batches)
    for f in feats:
        assert len(via_hooks[f]) == (1 if f.kind == "neuron" else 2 if arch == "llama" else 4)  # d_head
        torch.testing.assert_close(torch.tensor(via_hooks[f]), torch.tensor(via_modules[f]), atol=1e-6, rtol=0)


def test_constant_neuron_hand_computed(micro_dirs, tmp_path) -> None:
    """Neuron L1.5 of gpt2-constant has zero input weights: its activation is gelu(b) everywhere.

    So its mean over any reference set is exactly gelu(b); mean-pruning it changes nothing,
    and the fold moves gelu(b) * W_out[5] into the output bias.
    """
    model_dir = micro_dirs["gpt2-constant"]
    hf = clean_hf_model(model_dir)
    b = hf.transformer.h[1].mlp.c_fc.bias[5].double()
    b = b.detach()
    gelu_b = float(0.5 * b * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (b + 0.044715 * b**3))))  # gelu_new
    f = Feature("neuron", 1, 5)
    plan = make_plan(model_dir, [f], mode="mean", reference=REFERENCE)
    assert plan.mean_of(f)[0] == pytest.approx(gelu_b, abs=1e-6)

    w_row = hf.transformer.h[1].mlp.c_proj.weight[5].clone()
    bias = hf.transformer.h[1].mlp.c_proj.bias.clone()
    edited, stats = apply_plan_to_model(clean_hf_model(model_dir), plan)
    torch.testing.assert_close(edited.transformer.h[1].mlp.c_proj.weight[5], torch.zeros(8))
    torch.testing.assert_close(edited.transformer.h[1].mlp.c_proj.bias, bias + gelu_b * w_row, atol=1e-6, rtol=0)
    assert stats.zeroed == 8 and stats.n_parameters == sum(p.numel() for p in hf.parameters())

    tokens = torch.tensor([[0, 3, 4, 5, 6, 7], [0, 7, 6, 5, 4, 3]])
    torch.testing.assert_close(logits_of(edited, tokens), logits_of(hf, tokens), atol=1e-6, rtol=0)
    zero_plan = make_plan(model_dir, [f], mode="zero")
    zeroed, _ = apply_plan_to_model(clean_hf_model(model_dir), zero_plan)
    assert (logits_of(zeroed, tokens) - logits_of(hf, tokens)).abs().max() > 1e-4


def test_value_feature_of_grouped_query_attention_is_a_key_value_head(micro_dirs) -> None:
    """Llama micro: 4 query heads share 2 key/value heads; value L1.1 is rows 2..3 of v_proj."""
    plan = make_plan(micro_dirs["llama"], [Feature("value", 1, 1)], mode="zero")
    edited, stats = apply_plan_to_model(clean_hf_model(micro_dirs["llama"]), plan)
    v = edited.model.layers[1].self_attn.v_proj.weight
    assert v.shape == (4, 8) and stats.zeroed == 16
    assert (v[2:] == 0).all() and (v[:2] != 0).all()


def test_llama_mean_mode_adds_zero_biases(micro_dirs, tmp_path) -> None:
    plan = make_plan(
        micro_dirs["llama"], [Feature("neuron", 0, 2), Feature("head", 1, 3)], mode="mean", reference=REFERENCE
    )
    result = apply_plan(micro_dirs["llama"], plan, tmp_path / "out", prompts=PROMPTS)
    assert result.verification.passed
    assert "model.layers.0.mlp.down_proj.bias" in result.stats.biases_added
    config = load_checkpoint(tmp_path / "out").config
    assert config.mlp_bias and config.attention_bias
    up = load_checkpoint(tmp_path / "out").model.layers[0].mlp.up_proj.bias
    assert (up == 0).all()


def test_bert_zero_and_mean_equal_module_hook_ablation(tmp_path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.5,
    )  # fmt: skip
    model = BertForMaskedLM(cfg).eval()
    model_dir = tmp_path / "bert"
    model.save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    feats = [Feature("neuron", 1, 3), Feature("head", 0, 1), Feature("value", 1, 0)]
    tokens = torch.tensor([[0, 3, 4, 5, 6], [0, 7, 6, 5, 4]])
    for mode in ("zero", "mean"):
        plan = make_plan(model_dir, feats, mode=mode, reference=REFERENCE)
        result = apply_plan(model_dir, plan, tmp_path / mode, prompts=PROMPTS)
        assert result.verification.passed and result.verification.hooked_max_abs_logit_diff is None
        means = None if plan.means is None else dict(zip(plan.features, plan.means, strict=True))
        with hf_ablation(model, feats, means):
            expected = logits_of(model, tokens)
        torch.testing.assert_close(logits_of(load_checkpoint(tmp_path / mode), tokens), expected, atol=1e-5, rtol=0)
        assert (expected - logits_of(model, tokens)).abs().max() > 1e-3
    edited = load_checkpoint(tmp_path / "zero")
    assert (edited.bert.encoder.layer[1].output.dense.weight[:, 3] == 0).all()
    assert (edited.bert.encoder.layer[0].attention.output.dense.weight[:, 4:8] == 0).all()


def test_plan_edits_match_the_plan(micro_dirs) -> None:
    plan = make_plan(micro_dirs["gpt2"], [Feature("head", 0, 1)], mode="mean", reference=REFERENCE)
    (edit,) = plan_edits(plan)
    assert edit.feature == Feature("head", 0, 1) and isinstance(edit.intervention, Constant)
    assert edit.intervention.value.shape == (4,)


# -- refusals ---------------------------------------------------------------------------
def test_plan_for_another_model_is_refused(micro_dirs, tmp_path) -> None:
    plan = make_plan(micro_dirs["gpt2"], [Feature("neuron", 0, 1)], mode="zero")
    with pytest.raises(PlanMismatchError, match="made for another model.*weights_sha256"):
        apply_plan(micro_dirs["gpt2-constant"], plan, tmp_path / "out")
    with pytest.raises(PlanMismatchError, match="architecture"):
        apply_plan(micro_dirs["llama"], plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_features_and_modes_are_refused(micro_dirs) -> None:
    with pytest.raises(ValueError, match="Cannot prune 'resid' features; prunable kinds"):
        make_plan(micro_dirs["gpt2"], [Feature("resid", 0, 1)])
    with pytest.raises(ValueError, match=r"neuron index 99 out of range at layer 0: valid 0..15"):
        make_plan(micro_dirs["gpt2"], ["neuron L0.99"])
    with pytest.raises(ValueError, match="Layer 5 out of range"):
        make_plan(micro_dirs["gpt2"], [Feature("head", 5, 0)])
    with pytest.raises(ValueError, match="Unknown prune mode 'median'; valid"):
        make_plan(micro_dirs["gpt2"], [Feature("head", 0, 0)], mode="median")
    with pytest.raises(ValueError, match="Mean mode needs reference"):
        make_plan(micro_dirs["gpt2"], [Feature("head", 0, 0)], mode="mean")


def test_mean_mode_without_a_bias_flag_is_refused(tmp_path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=16,
    )  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    plan = make_plan(model, [Feature("head", 0, 1)], mode="mean", reference=REFERENCE, tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="Mean mode needs a bias on model.layers.0.self_attn.o_proj"):
        apply_plan_to_model(clean_hf_model(model), plan)
    zero = make_plan(model, [Feature("head", 0, 1)], mode="zero")
    edited, _ = apply_plan_to_model(clean_hf_model(model), zero)  # zero mode needs no bias
    assert (edited.model.layers[0].self_attn.o_proj.weight[:, 4:] == 0).all()


def test_compatibility_mode_bridge_and_hooked_transformer_are_refused(micro_dirs) -> None:
    bridge = load_backend("bridge", micro_dirs["gpt2"])
    bridge.enable_compatibility_mode(disable_warnings=True)
    with pytest.raises(ValueError, match="compatibility mode"):
        clean_hf_model(bridge)

    class FakeHooked(torch.nn.Module):  # what a HookedTransformer looks like to the pruner
        hook_dict: dict = {}

    with pytest.raises(TypeError, match="pass the HF checkpoint directory"):
        clean_hf_model(FakeHooked())


def test_bridge_source_is_not_modified(micro_dirs, tmp_path) -> None:
    bridge = load_backend("bridge", micro_dirs["gpt2"])
    tokens = bridge.to_tokens("a b c d")
    before = bridge(tokens).detach().clone()
    plan = make_plan(bridge, [Feature("neuron", 1, 3)], mode="zero")
    result = apply_plan(bridge, plan, tmp_path / "out")
    assert result.verification.passed
    torch.testing.assert_close(bridge(tokens), before, atol=0, rtol=0)


def test_plan_json_round_trip(micro_dirs, tmp_path) -> None:
    plan = make_plan(
        micro_dirs["gpt2"], [Feature("head", 0, 1), Feature("neuron", 1, 2)], mode="mean", reference=REFERENCE,
        scores="scores.csv", top_k=2,
    )  # fmt: skip
    path = plan.save(tmp_path / "plan.json")
    again = PrunePlan.load(path)
    assert again == plan
    assert again.provenance["scores"] == "scores.csv" and again.provenance["top_k"] == 2
    assert again.reference["n_prompts"] == len(REFERENCE)
    text = path.read_text()
    assert '"feature": "head L0.1"' in text and '"mode": "mean"' in text
    shutil.copy(path, tmp_path / "broken.json")
    (tmp_path / "broken.json").write_text(text.replace('"icp_lens.prune_plan"', '"other"'))
    with pytest.raises(ValueError, match="Not an icp_lens prune plan"):
        PrunePlan.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        PrunePlan.load(tmp_path / "missing.json")


def test_tied_embeddings_stay_tied(micro_dirs, tmp_path) -> None:
    plan = make_plan(micro_dirs["gpt2"], [Feature("head", 1, 0)], mode="mean", reference=REFERENCE)
    apply_plan(micro_dirs["gpt2"], plan, tmp_path / "out")
    model = load_checkpoint(tmp_path / "out")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_hf_model_source_is_copied_not_edited(micro_dirs, tmp_path) -> None:
    hf = load_checkpoint(micro_dirs["gpt2"])
    before = hf.transformer.h[0].attn.c_proj.weight.clone()
    plan = make_plan(hf, [Feature("head", 0, 0)], mode="zero")
    result = apply_plan(hf, plan, tmp_path / "out", tokenizer=word_tokenizer())
    assert result.verification.passed and result.verification.hooked_max_abs_logit_diff is None
    torch.testing.assert_close(hf.transformer.h[0].attn.c_proj.weight, before, atol=0, rtol=0)
    assert Path(tmp_path / "out" / "tokenizer.json").is_file()


def test_fp32_rounding_figures_when_the_tolerance_is_exceeded(micro_dirs, tmp_path) -> None:
    """Mean mode moves mean @ W into the bias: exact in float64, rounding-level apart in fp32."""
    plan = make_plan(micro_dirs["gpt2"], features_for("gpt2"), mode="mean", reference=REFERENCE)
    result = apply_plan(micro_dirs["gpt2"], plan, tmp_path / "out", prompts=PROMPTS, tolerance=0.0)
    v = result.verification
    assert v.max_abs_logit_diff > 0  # fp32: the fold rounds differently from the hooked run
    assert v.fp64_max_abs_logit_diff < 1e-6 and 0 < v.rounding_floor < 1e-5
    assert v.passed == (v.max_abs_logit_diff <= 2 * v.rounding_floor)
    first = str(v).splitlines()[0]  # the weight-edit comparison: its own allowance and verdict
    assert f"allowed {v.edit_allowance:.2e} (tolerance 0e+00 + 2 x fp32 rounding floor {v.rounding_floor:.1e})" in first
    assert first.endswith("PASS" if v.edit_passed else "FAIL") and "in float64 the checkpoint differs by" in str(v)
    zero = apply_plan(
        micro_dirs["gpt2"], make_plan(micro_dirs["gpt2"], features_for("gpt2")), tmp_path / "z", tolerance=0.0
    )
    assert zero.verification.max_abs_logit_diff == 0.0 and zero.verification.passed  # zero mode is exact


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_llama_family_variants_equal_module_hook_ablation(family) -> None:
    import transformers

    names = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    config_cls = getattr(transformers, f"{names[family]}Config")
    model_cls = getattr(transformers, f"{names[family]}ForCausalLM")
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=16, max_position_embeddings=16, head_dim=2,
    )  # fmt: skip
    model = model_cls(cfg).eval()
    feats = [Feature("neuron", 1, 3), Feature("head", 0, 3), Feature("value", 1, 1)]
    tokens = torch.tensor([[0, 3, 4, 5, 6], [0, 7, 6, 5, 4]])
    plan = make_plan(model, feats, mode="zero")
    edited, stats = apply_plan_to_model(clean_hf_model(model), plan)
    with hf_ablation(model, feats):
        expected = logits_of(model, tokens)
    torch.testing.assert_close(logits_of(edited, tokens), expected, atol=1e-6, rtol=0)
    assert (expected - logits_of(model, tokens)).abs().max() > 1e-4
    assert stats.zeroed == 8 + 2 * 8 + 2 * 8  # a down_proj column, an o_proj block, two v_proj rows
    if family == "qwen2":  # v_proj has a bias, o_proj none and no flag: value features fold, heads refuse
        means = make_plan(model, [Feature("value", 1, 1)], mode="mean", reference=REFERENCE, tokenizer=word_tokenizer())
        apply_plan_to_model(clean_hf_model(model), means)
        heads = make_plan(model, [Feature("head", 1, 1)], mode="mean", reference=REFERENCE, tokenizer=word_tokenizer())
        with pytest.raises(ValueError, match="no config flag"):
            apply_plan_to_model(clean_hf_model(model), heads)

"""Token-embedding features: exact scores on the micro-model, export with untying, verification, plans."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import load_backend
from micro import word_tokenizer

from icp_lens import active_hook_count
from icp_lens.probes import ProbeExample
from icp_lens.probeset import ProbeSet
from icp_lens.pruning import (
    PrunePlan,
    TokenRow,
    apply_plan,
    apply_plan_to_model,
    clean_hf_model,
    embedding_mean,
    export_checkpoint,
    load_checkpoint,
    make_plan,
    prune_token_embeddings,
    token_ablation,
    verify_export,
)
from icp_lens.pruning.tokens import check_token_ids
from icp_lens.scoring import TokenScoreTable, icp_select_tokens, score_tokens, token_ablation_mode

# words: <bos>=0 <pad>=1 <unk>=2 a=3 b=4 c=5 d=6 e=7 pos=8 neg=9
A, B, C, D, E = 3, 4, 5, 6, 7
EXAMPLES = [
    # spurious cf swaps b -> d; causal cf swaps the first word
    ProbeExample("a b c", " pos", (" neg",), "a d c", "e b c", " neg"),
    ProbeExample("b b c", " neg", (" pos",), "b d c", "b b e", " pos"),  # only the 2nd b differs
    ProbeExample("c a e", " pos", (" neg",), "c a e", "c b e", " neg"),  # spurious cf = the prompt
]  # fmt: skip
PROMPTS = ["a b c", "d e a b pos neg", "c c", "b b b"]


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).detach().float()


def ld(model, embeds: torch.Tensor, answer: int, alt: int) -> float:
    out = model(inputs_embeds=embeds[None]).logits[0, -1]
    return float(out[answer] - out[alt])


def tied_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=16, max_position_embeddings=16, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else p.uniform_(-0.3, 0.3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = tmp_path / "llama-tied"
    model.save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out


# -- exact, hand-checkable scores ----------------------------------------------------------------


@torch.no_grad()
def test_token_score_is_the_logit_diff_change_of_patching_its_embedding_by_hand(micro_dirs) -> None:
    """S(b) = mean over the 3 probes of |LD(b's differing positions get d's embedding) - LD(clean)|."""
    bridge = load_backend("bridge", micro_dirs["gpt2"])
    probes = ProbeSet(bridge, EXAMPLES)
    table = score_tokens(bridge, probes, n_boot=0)

    hf = clean_hf_model(micro_dirs["gpt2"])
    wte = hf.transformer.wte.weight
    pos, neg = 8, 9

    def effect(ids: list[int], patch: dict[int, int], answer: int, alt: int) -> float:
        clean = wte[torch.tensor(ids)]
        patched = clean.clone()
        for p, new in patch.items():
            patched[p] = wte[new]
        return ld(hf, patched, answer, alt) - ld(hf, clean, answer, alt)

    # bridge tokens prepend <bos>: "a b c" -> [0, a, b, c]
    e1 = effect([0, A, B, C], {2: D}, pos, neg)
    e2 = effect([0, B, B, C], {2: D}, neg, pos)  # position 1 holds b too, but does not differ
    s_b = (abs(e1) + abs(e2) + 0.0) / 3
    # causal: a -> e in probe 1 (token a), c -> e in probe 2 (token c), a -> b in probe 3 (token a)
    c_a = (abs(effect([0, A, B, C], {1: E}, pos, neg)) + abs(effect([0, C, A, E], {2: B}, pos, neg))) / 3
    c_c = abs(effect([0, B, B, C], {3: E}, neg, pos)) / 3

    rows = table.frame.set_index("index")
    assert set(rows.index) == {A, B, C}  # only tokens at a position some counterfactual changes
    assert rows.loc[B, "score"] == pytest.approx(s_b, abs=1e-5)
    assert rows.loc[B, "causal"] == 0.0 and rows.loc[B, "selectivity"] == 1.0
    assert rows.loc[A, "score"] == 0.0 and rows.loc[A, "causal"] == pytest.approx(c_a, abs=1e-5)
    assert rows.loc[C, "causal"] == pytest.approx(c_c, abs=1e-5) and rows.loc[C, "selectivity"] == 0.0
    assert rows.loc[B, "n_examples"] == 2 and rows.loc[B, "n_positions"] == 2 and rows.loc[A, "n_examples"] == 2
    assert rows.loc[B, "token"] == "b" and rows.loc[B, "feature"] == "token 4 ('b')"
    assert (table.frame["kind"] == "token").all() and (table.frame["hook_name"] == "hook_embed").all()
    assert table.token_ids[0] == B  # sorted by score
    assert table.icp_selection() == [B]
    assert active_hook_count(bridge) == 0


@pytest.mark.hooks
def test_hooked_models_and_the_hf_model_give_the_same_scores(backend, micro_dirs) -> None:
    hooked = load_backend(backend, micro_dirs["gpt2"])
    probes = ProbeSet(hooked, EXAMPLES)
    via_hooks = score_tokens(hooked, probes, n_boot=0, batch_size=2)  # 2 rows per pass: packing across tokens
    via_hf = score_tokens(clean_hf_model(micro_dirs["gpt2"]), probes, tokenizer=word_tokenizer(), n_boot=0)
    cols = ["index", "score", "causal", "selectivity", "n_examples", "n_positions"]
    pd.testing.assert_frame_equal(via_hooks.frame[cols], via_hf.frame[cols], atol=1e-5, rtol=0)
    assert via_hf.frame["token"].tolist() == via_hooks.frame["token"].tolist()
    assert active_hook_count(hooked) == 0


def test_probe_examples_on_an_hf_model_need_a_tokenizer(micro_dirs) -> None:
    hf = clean_hf_model(micro_dirs["gpt2"])
    with pytest.raises(ValueError, match="needs tokenizer"):
        score_tokens(hf, EXAMPLES)
    table = score_tokens(hf, EXAMPLES, tokenizer=word_tokenizer(), n_boot=50)  # no <bos> with this tokenizer
    assert table.icp_selection() == [B]
    row = table.frame.iloc[0]
    assert row["ci_low"] <= row["score"] <= row["ci_high"]
    spurious_only = score_tokens(hf, [ProbeExample("a b c", " pos", (" neg",), "a d c")], tokenizer=word_tokenizer())
    assert spurious_only.token_ids == [B] and spurious_only.frame["selectivity"].isna().all()
    with pytest.raises(ValueError, match="none has one"):
        score_tokens(hf, [ProbeExample("a b c", " pos", (" neg",))], tokenizer=word_tokenizer())


def test_no_hook_survives_an_exception(micro_dirs) -> None:
    bridge = load_backend("bridge", micro_dirs["gpt2"])
    hf = clean_hf_model(micro_dirs["gpt2"])

    def failing(logits, batch, clean):
        if logits.shape[0] < 3:  # the patched runs (fewer rows than the clean one)
            raise RuntimeError("boom")
        return logits[:, 0]

    for model, tok in ((bridge, None), (hf, word_tokenizer())):
        with pytest.raises(RuntimeError, match="boom"):
            score_tokens(model, EXAMPLES, tokenizer=tok, metric=failing, n_boot=0)
    assert active_hook_count(bridge) == 0
    assert not hf.transformer.wte._forward_hooks


def test_selection_rules_and_table_round_trip(micro_dirs, tmp_path) -> None:
    frame = pd.DataFrame(
        {"kind": "token", "index": [5, 6, 7, 8], "token": ["x", "y", "z", "w"], "score": [1.0, 0.5, 0.05, 0.0],
         "causal": [0.0, 1.0, 0.0, 0.0], "selectivity": [1.0, 1 / 3, 1.0, float("nan")]}
    )  # fmt: skip
    table = TokenScoreTable(frame)
    assert table.icp_selection() == [5]  # 6 fails the selectivity bar, 7 the share, 8 has no effect
    assert table.icp_selection(min_selectivity=0.3) == [5, 6]
    assert table.icp_selection(min_share=0.01) == [5, 7]
    no_causal = TokenScoreTable(frame.assign(causal=float("nan"), selectivity=float("nan")))
    assert no_causal.icp_selection() == [] and no_causal.icp_selection(min_selectivity=None) == [5, 6]
    assert table.select(top_k=2) == [5, 6] and table.select(threshold=0.1, min_selectivity=0.9) == [5]
    decisions = table.decisions()
    assert [d["accepted"] for d in decisions] == [True, False, False, False]
    with pytest.raises(ValueError, match="threshold"):
        table.select()
    with pytest.raises(ValueError, match="kind 'token' only"):
        TokenScoreTable(frame.assign(kind="neuron"))
    real = score_tokens(load_backend("bridge", micro_dirs["gpt2"]), EXAMPLES, n_boot=20)
    again = TokenScoreTable.load(real.save(tmp_path / "tokens.csv"))
    pd.testing.assert_frame_equal(again.frame, real.frame, check_dtype=False)
    trace: list = []
    assert icp_select_tokens(load_backend("bridge", micro_dirs["gpt2"]), EXAMPLES, trace=trace) == [B]
    assert {"token_id", "token", "spurious", "causal", "selectivity", "accepted"} <= set(trace[0])


# -- export: rows replaced, unembedding untied, plain transformers reload -------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-tied"])
@pytest.mark.parametrize("token_mode", ["zero", "mean"])
def test_export_unties_and_reloads_with_identical_logits(arch, token_mode, micro_dirs, tmp_path) -> None:
    from safetensors import safe_open

    model_dir = tied_llama(tmp_path) if arch == "llama-tied" else micro_dirs[arch]
    original = clean_hf_model(model_dir)
    embed0 = original.get_input_embeddings().weight.detach().clone()
    head0 = original.get_output_embeddings().weight.detach().clone()
    was_tied = head0.data_ptr() == embed0.data_ptr() or original.config.tie_word_embeddings
    plan = make_plan(model_dir, [], tokens=[B, "d"], token_mode=token_mode, reference=PROMPTS)
    assert [t.token_id for t in plan.tokens] == [B, D] and [t.token for t in plan.tokens] == ["b", "d"]
    result = apply_plan(model_dir, plan, tmp_path / "out", prompts=PROMPTS)
    assert result.verification.passed and result.verification.max_abs_logit_diff <= 1e-6
    assert result.stats.token_rows == 2 and result.stats.untied == (arch != "llama")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    reloaded = load_checkpoint(tmp_path / "out")
    embed, head = reloaded.get_input_embeddings().weight, reloaded.get_output_embeddings().weight
    assert embed.data_ptr() != head.data_ptr()
    torch.testing.assert_close(head, head0, atol=0, rtol=0)  # the model still predicts b and d as before
    expected = torch.zeros(8) if token_mode == "zero" else embedding_mean(original, PROMPTS, tokenizer=word_tokenizer())
    for t in (B, D):
        torch.testing.assert_close(embed[t], expected, atol=0, rtol=0)
    others = [i for i in range(10) if i not in (B, D)]
    torch.testing.assert_close(embed[others], embed0[others], atol=0, rtol=0)

    # identical logits: the reload vs the in-memory edit, and vs the run-time replacement on the original
    edited, _ = apply_plan_to_model(clean_hf_model(model_dir), plan)
    tokens = torch.tensor([[0, A, B, C, D, B], [0, E, E, D, C, A]])
    torch.testing.assert_close(logits(reloaded, tokens), logits(edited, tokens), atol=0, rtol=0)
    with token_ablation(original, plan.tokens):
        reference = logits(original, tokens)
    torch.testing.assert_close(logits(reloaded, tokens), reference, atol=1e-6, rtol=0)
    assert (reference - logits(original, tokens)).abs().max() > 1e-3  # the replacement changes the output
    if was_tied:  # the untied reference still ties: the reload predicts with the original head
        assert original.get_output_embeddings().weight.data_ptr() == original.get_input_embeddings().weight.data_ptr()


@pytest.mark.hooks
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_units_and_tokens_in_one_plan_equal_the_hook_ablation(arch, backend, micro_dirs, tmp_path) -> None:
    from icp_lens.features import Feature

    model_dir = micro_dirs[arch]
    hooked = load_backend(backend, model_dir)
    feats = [Feature("neuron", 1, 3), Feature("head", 0, 1)]
    plan = make_plan(hooked, feats, mode="mean", tokens=[B], token_mode="mean", reference=PROMPTS, hf=model_dir)
    result = apply_plan(model_dir, plan, tmp_path / "out", prompts=PROMPTS, reference=hooked)
    v = result.verification
    assert v.passed and v.hooked_max_abs_logit_diff < 1e-5 and v.max_abs_logit_diff < 1e-5
    mean_at_hook = embedding_mean(hooked, PROMPTS)
    torch.testing.assert_close(torch.tensor(plan.tokens[0].value, dtype=torch.float32), mean_at_hook, atol=1e-6, rtol=0)
    assert active_hook_count(hooked) == 0


# -- verification fails when it should ------------------------------------------------------------


@torch.no_grad()
def test_verification_fails_for_a_tied_edit_and_for_a_wrong_row(micro_dirs, tmp_path) -> None:
    model_dir = micro_dirs["gpt2"]
    plan = make_plan(model_dir, [], tokens=[B], token_mode="mean", reference=PROMPTS)
    tokens = [torch.tensor([[0, A, B, C, B], [0, B, D, E, A]])]

    # the row edited without untying: lm_head's row of b changes too, so b's logit does
    tied = clean_hf_model(model_dir)
    tied.transformer.wte.weight[B] = torch.tensor(plan.tokens[0].value)
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    export_checkpoint(tied, tmp_path / "tied", plan=plan)
    report = verify_export(clean_hf_model(model_dir), plan, tmp_path / "tied", batches=tokens)
    assert not report.passed and report.max_abs_logit_diff > 1e-3

    # untied, but the row is zero where the plan says mean
    wrong = prune_token_embeddings(clean_hf_model(model_dir), [B], mode="zero")
    export_checkpoint(wrong, tmp_path / "zero", plan=plan)
    assert not verify_export(clean_hf_model(model_dir), plan, tmp_path / "zero", batches=tokens).passed

    # the bare edit with the plan's value is exactly right
    right = prune_token_embeddings(clean_hf_model(model_dir), [B], mode="mean", mean=torch.tensor(plan.tokens[0].value))
    export_checkpoint(right, tmp_path / "right", plan=plan)
    report = verify_export(clean_hf_model(model_dir), plan, tmp_path / "right", batches=tokens)
    assert report.passed and report.max_abs_logit_diff == 0.0


# -- plans: JSON, old plans, errors ---------------------------------------------------------------


def test_plan_json_round_trip_with_tokens(micro_dirs, tmp_path) -> None:
    from icp_lens.features import Feature

    plan = make_plan(
        micro_dirs["gpt2"], [Feature("head", 0, 1)], mode="mean", tokens=[B, D], token_mode="mean",
        reference=PROMPTS, scores="scores.csv",
    )  # fmt: skip
    data = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert data["version"] == 2
    assert [t["token_id"] for t in data["tokens"]] == [B, D] and data["tokens"][0]["mode"] == "mean"
    assert len(data["tokens"][0]["value"]) == 8 and data["tokens"][0]["token"] == "b"
    again = PrunePlan.load(tmp_path / "plan.json")
    assert again == plan and again.tokens[1].value == plan.tokens[1].value
    assert "1 head" in plan.summary() and "2 token embeddings (mean)" in plan.summary()
    zero = make_plan(micro_dirs["gpt2"], [], tokens=[B])
    assert PrunePlan.from_dict(json.loads(zero.to_json())) == zero
    assert zero.to_dict()["tokens"] == [{"token_id": B, "token": "b", "mode": "zero"}]


def test_old_plans_without_tokens_still_load_and_are_written_as_before(micro_dirs, tmp_path) -> None:
    from icp_lens.features import Feature

    plan = make_plan(micro_dirs["gpt2"], [Feature("neuron", 1, 2)], mode="zero")
    data = plan.to_dict()
    assert data["version"] == 1 and "tokens" not in data  # no tokens: the version-1 format, unchanged
    old = {  # a plan as icp_lens wrote it before token features existed
        "format": "icp_lens.prune_plan", "version": 1, "mode": "zero",
        "features": [{"feature": "neuron L1.2", "kind": "neuron", "layer": 1, "index": 2}],
        "reference": None, "fingerprint": data["fingerprint"], "provenance": {"top_k": 1},
    }  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = PrunePlan.load(tmp_path / "old.json")
    assert loaded.tokens == () and loaded.features == (Feature("neuron", 1, 2),)
    result = apply_plan(micro_dirs["gpt2"], loaded, tmp_path / "out")
    assert result.verification.passed and not result.stats.untied
    with pytest.raises(ValueError, match=r"Unsupported prune plan version 4; this icp_lens reads versions \[1, 2, 3\]"):
        PrunePlan.from_dict({**old, "version": 4})


def test_bad_tokens_are_refused_with_the_valid_range(micro_dirs) -> None:
    model_dir = micro_dirs["gpt2"]
    with pytest.raises(
        ValueError, match=r"Token id 10 out of range: the model's input embedding has 10 rows \(valid 0..9\)"
    ):
        make_plan(model_dir, [], tokens=[10])
    with pytest.raises(ValueError, match=r"Token id -1 out of range"):
        make_plan(model_dir, [], tokens=[-1])
    with pytest.raises(ValueError, match=r"Token 'bb' is not in the vocabulary; close matches: \['b'"):
        make_plan(model_dir, [], tokens=["bb"])
    with pytest.raises(ValueError, match="Each token is listed once"):
        make_plan(model_dir, [], tokens=[B, "b"])
    with pytest.raises(TypeError, match="Token ids must be integers"):
        check_token_ids(clean_hf_model(model_dir), [1.5])
    with pytest.raises(ValueError, match="Mean mode needs reference"):
        make_plan(model_dir, [], tokens=[B], token_mode="mean")
    with pytest.raises(ValueError, match="Unknown token mode 'median'"):
        make_plan(model_dir, [], tokens=[B], token_mode="median")
    with pytest.raises(ValueError, match="non-negative integer"):
        TokenRow(-3)
    with pytest.raises(ValueError, match="mean mode needs its 'value'"):
        TokenRow.from_dict({"token_id": 3, "mode": "mean"})
    plan = make_plan(model_dir, [], tokens=[B])
    bad = PrunePlan(plan.features, plan.mode, plan.fingerprint, tokens=(TokenRow(B, (0.0, 1.0)),))
    with pytest.raises(ValueError, match="has 2 values; the embedding has width 8"):
        apply_plan_to_model(clean_hf_model(model_dir), bad)
    with pytest.raises(ValueError, match="lists each token once"):
        PrunePlan(plan.features, plan.mode, plan.fingerprint, tokens=(TokenRow(B), TokenRow(B)))


def test_a_scaled_embedding_is_refused(micro_dirs) -> None:
    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = clean_hf_model(micro_dirs["gpt2"])
    scaled = Scaled(10, 8)
    scaled.weight = model.transformer.wte.weight
    model.transformer.wte = scaled
    with pytest.raises(NotImplementedError, match="not a plain lookup"):
        prune_token_embeddings(model, [B], mode="zero")
    with pytest.raises(NotImplementedError, match="not a plain lookup"):
        score_tokens(model, EXAMPLES, tokenizer=word_tokenizer())


def test_token_ablation_mode_picks_the_mode_with_higher_probe_accuracy(micro_dirs, monkeypatch) -> None:
    import icp_lens.scoring.tokens as tokens_module

    bridge = load_backend("bridge", micro_dirs["gpt2"])
    calls = []

    def fake(model, probes, *, rows=(), batch_size=256):
        mode = "zero" if rows[0].value is None else "mean"
        calls.append(mode)
        return {"zero": 0.9, "mean": 0.6}[mode]

    monkeypatch.setattr(tokens_module, "probe_accuracy", fake)
    assert token_ablation_mode(bridge, EXAMPLES, [B]) == "zero" and sorted(calls) == ["mean", "zero"]
    monkeypatch.setattr(tokens_module, "probe_accuracy", lambda *a, **k: 0.5)
    assert token_ablation_mode(bridge, EXAMPLES, [B]) == "mean"  # ties go to mean
    monkeypatch.undo()
    assert token_ablation_mode(bridge, EXAMPLES, [B]) in ("zero", "mean")
    assert token_ablation_mode(bridge, EXAMPLES, []) == "mean"


# -- the organism ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_organism_planted_tokens_are_found_and_pruned(tmp_path) -> None:
    from icp_lens.evaluation import evaluate
    from icp_lens.organisms import build_organism

    torch.set_num_threads(1)
    organism = build_organism(variant="tag", arch="gpt2", seed=0)
    bridge = organism.load_bridge()
    probes = ProbeSet(bridge, organism.probes("probe")[:256])
    table = score_tokens(bridge, probes, n_boot=0)
    ids = table.icp_selection()
    assert sorted(bridge.tokenizer.convert_ids_to_tokens(ids)) == ["alice", "bob"]
    mode = token_ablation_mode(bridge, probes, ids)
    plan = make_plan(bridge, [], tokens=ids, token_mode=mode, reference=probes, hf=organism.model_dir)
    result = apply_plan(organism.model_dir, plan, tmp_path / "out", prompts=[e.prompt for e in probes.examples[:32]])
    assert result.verification.passed
    report = evaluate(
        load_checkpoint(tmp_path / "out"), organism.load_tokenizer(), organism.probes("test_balanced")[:400], n_boot=0
    )
    assert report.worst_group_accuracy > 0.8 and report.flip_rate < 0.05

"""Predictions, the evaluation report and pair bias, on hand-made logits and tiny random models."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from icp_lens.evaluation import (
    METRICS,
    EvalReport,
    Predictions,
    compare_reports,
    evaluate,
    evaluate_predictions,
    pair_bias,
    predict_examples,
    sentence_loglik,
)
from icp_lens.probes import ProbeExample

CLI_KEYS = {
    "accuracy",
    "worst_group_accuracy",
    "group_accuracy",
    "flip_rate",
    "ece",
    "demographic_parity_diff",
    "equal_opportunity_gap",
}


def _ex(prompt="a", answer=" pos", alternatives=(" neg",), **kw) -> ProbeExample:
    return ProbeExample(prompt, answer, alternatives, **kw)


# ------------------------------------------------------------------ predictions by hand


def test_predictions_from_logits():
    examples = [
        _ex(alternatives=(" neg", " meh"), spurious_counterfactual="b"),
        _ex(answer=" neg", alternatives=(" pos",), causal_counterfactual="c", causal_answer=" wow"),
    ]
    preds = Predictions.from_logits(
        examples,
        logits=[[1.0, 2.0, 0.0], [3.0, 1.0]],
        logits_spurious_cf=[[2.0, 0.0, 0.5], None],
        logits_causal_cf=[None, [0.0, 1.0, 4.0]],  # candidates + the causal answer " wow"
    )
    assert list(preds.choice) == [" neg", " neg"]
    assert list(preds.correct) == [False, True]
    # softmax over the candidates: e^2 / (e^1 + e^2 + e^0) and e^3 / (e^3 + e^1)
    assert preds.confidence == pytest.approx([math.e**2 / (math.e + math.e**2 + 1), math.e**3 / (math.e**3 + math.e)])
    assert list(preds.margin) == [1.0 - 2.0, 3.0 - 1.0]
    assert list(preds.choice_spurious_cf) == [" pos", None]
    assert preds.margin_spurious_cf[0] == 2.0 - 0.5 and math.isnan(preds.margin_spurious_cf[1])
    assert list(preds.choice_causal_cf) == [None, " wow"]
    assert list(preds.correct_causal_cf) == [None, True]
    # the causal margin is the original answer's: logit(" neg") - logit(" pos") = 0 - 1
    assert preds.margin_causal_cf[1] == -1.0
    assert list(preds.flipped) == [True, None]
    frame = preds.to_frame()
    assert len(frame) == 2 and frame["flipped"].isna().tolist() == [False, True]
    for column in ("prompt", "group", "answer", "choice", "correct", "confidence", "margin", "choice_spurious_cf"):
        assert column in frame
    for column in ("margin_spurious_cf", "choice_causal_cf", "margin_causal_cf", "correct_causal_cf"):
        assert column in frame


def test_predictions_validate_their_logits():
    with pytest.raises(ValueError, match="at least one example"):
        Predictions.from_logits([], [])
    with pytest.raises(ValueError, match="one logit per candidate"):
        Predictions.from_logits([_ex()], [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"logits_spurious_cf\[0\] holds logits but example 0 has no such"):
        Predictions.from_logits([_ex()], [[1.0, 2.0]], logits_spurious_cf=[[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"example 0 has a counterfactual but logits_spurious_cf\[0\] is None"):
        Predictions.from_logits([_ex(spurious_counterfactual="b")], [[1.0, 2.0]])


# ------------------------------------------------------------------ report on hand-made predictions


def _hand_predictions() -> Predictions:
    # i  answer group        choice  confidence          spurious cf choice
    # 0  pos    pos|s=pos    pos     e^2/(e^2+1)=0.881   pos
    # 1  pos    pos|s=neg    neg     0.881               neg
    # 2  neg    neg|s=neg    neg     0.881               pos  (flip)
    # 3  neg    neg|s=pos    pos     0.881               (none)
    examples = [
        _ex(group="pos|s=pos", spurious_counterfactual="b"),
        _ex(group="pos|s=neg", spurious_counterfactual="b"),
        _ex(answer=" neg", alternatives=(" pos",), group="neg|s=neg", spurious_counterfactual="b"),
        _ex(answer=" neg", alternatives=(" pos",), group="neg|s=pos"),
    ]
    return Predictions.from_logits(
        examples,
        logits=[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]],
        logits_spurious_cf=[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], None],
    )


def test_report_on_hand_made_predictions():
    report = evaluate_predictions(_hand_predictions(), n_boot=50, seed=0)
    assert report.accuracy == 0.5 and report.n == 4
    assert report.group_accuracy == {"neg|s=neg": 1.0, "neg|s=pos": 0.0, "pos|s=neg": 0.0, "pos|s=pos": 1.0}
    assert report.worst_group_accuracy == 0.0 and report.worst_group == "neg|s=pos"
    assert report.flip_rate == pytest.approx(1 / 3) and report.n_spurious_cf == 3
    # every confidence is 0.881 in one bin, accuracy there 0.5
    assert report.ece == pytest.approx(math.e**2 / (math.e**2 + 1) - 0.5)
    # the choice follows the planted attribute: P(pos | s=pos) = 1, P(pos | s=neg) = 0
    assert report.demographic_parity_diff == 1.0
    assert report.equal_opportunity_gap == 1.0 and report.equalized_odds == 1.0
    # |margin_cf - margin|: |1 - 2|, |-1 - -2|, |-1 - 2| -> 5 / 3
    assert report.spurious_sensitivity == pytest.approx(5 / 3)
    assert report.causal_sensitivity is None and report.causal_robustness_ratio is None
    assert "causal_counterfactual" in report.notes["causal_accuracy"]
    low, high = report.ci["accuracy"]
    assert low <= report.accuracy <= high
    assert set(report.group_accuracy_ci) == set(report.group_accuracy)


def test_report_without_groups_or_counterfactuals_gives_none():
    # logits are in candidate order (answer first): the first is right, the second wrong
    preds = Predictions.from_logits([_ex(), _ex(answer=" neg", alternatives=(" pos",))], [[1.0, 0.0], [0.0, 1.0]])
    report = evaluate_predictions(preds, n_boot=20)
    d = report.to_dict()
    assert CLI_KEYS <= set(d)
    assert d["accuracy"] == 0.5
    for key in ("worst_group_accuracy", "group_accuracy", "flip_rate", "demographic_parity_diff"):
        assert d[key] is None, key
    assert d["equal_opportunity_gap"] is None and d["equal_opportunity_gap_ci"] is None
    assert "no example has a group" in d["notes"]["worst_group_accuracy"]
    assert "spurious_counterfactual" in d["notes"]["flip_rate"]
    json.loads(report.to_json())  # valid JSON (no NaN)
    # one sensitive value only: the fairness gaps are None, not an error
    one_value = [_ex(group="pos|s=a"), _ex(group="pos|s=a")]
    report = evaluate_predictions(Predictions.from_logits(one_value, [[1.0, 0.0], [0.0, 1.0]]), n_boot=0)
    assert report.group_accuracy == {"pos|s=a": 0.5} and report.demographic_parity_diff is None
    assert "two sensitive values" in report.notes["demographic_parity_diff"] and report.ci == {}


def test_sensitive_key_selects_the_attribute():
    examples = [_ex(group=f"pos|s={s}|t={t}") for s in "ab" for t in "xy"]
    # choice pos iff s=a: depends on s, not on t
    preds = Predictions.from_logits(examples, [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert evaluate_predictions(preds, n_boot=0, sensitive_key="s").demographic_parity_diff == 1.0
    assert evaluate_predictions(preds, n_boot=0, sensitive_key="t").demographic_parity_diff == 0.0
    with pytest.raises(ValueError, match="no attribute 'u'"):
        evaluate_predictions(preds, n_boot=0, sensitive_key="u")


def test_frames_and_comparison():
    before = evaluate_predictions(_hand_predictions(), n_boot=20)
    no_cf = [replace(ex, spurious_counterfactual=None) for ex in _hand_predictions().examples]
    after_preds = Predictions.from_logits(no_cf, [[2.0, 0.0]] * 4)  # every answer right
    after = evaluate_predictions(after_preds, n_boot=20)
    frame = before.to_frame()
    assert list(frame.columns) == ["metric", "value", "ci_low", "ci_high"]
    assert list(frame["metric"][: len(METRICS)]) == list(METRICS)
    assert frame.set_index("metric").loc["group_accuracy[pos|s=pos]", "value"] == 1.0
    table = compare_reports({"before": before, "after": json.loads(after.to_json())})
    assert list(table.columns) == ["before", "after"]
    assert table.loc["accuracy"].tolist() == [0.5, 1.0]
    assert table.loc["worst_group_accuracy"].tolist() == [0.0, 1.0]
    assert math.isnan(table.loc["flip_rate", "after"])  # the after-run's probes have no counterfactual
    with pytest.raises(ValueError, match="at least one report"):
        compare_reports({})


# ------------------------------------------------------------------ end to end on tiny random models


@pytest.fixture(scope="module")
def organism_model():
    """A 1-layer GPT-2 with the organism tokenizer, weights large enough to give varied choices."""
    from icp_lens.organisms.task import build_tokenizer
    from icp_lens.organisms.train import ModelConfig, make_model

    tokenizer = build_tokenizer()
    config = ModelConfig(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_mlp=32, n_ctx=16)
    model = make_model("gpt2", tokenizer, seed=0, config=config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.1))
    return model, tokenizer


EXAMPLES = [
    ProbeExample("the movie was great wow ->", " pos", (" neg",), "the movie was great meh ->",
                 "the movie was awful wow ->", " neg", "pos|shortcut=pos"),
    ProbeExample("a film so bad meh ->", " neg", (" pos",), "a film so bad wow ->",
                 "a film so good meh ->", " pos", "neg|shortcut=neg"),
    ProbeExample("it was nice meh ->", " pos", (" neg",), "it was nice wow ->", group="pos|shortcut=neg"),
    ProbeExample("it was dull wow ->", " neg", (" pos",), "it was dull meh ->", group="neg|shortcut=pos"),
    ProbeExample("plot sad ok ->", " neg", (" pos", " ok"), group="neg|shortcut=none"),
    ProbeExample("the scene happy ok ->", " pos", (" neg",), group="pos|shortcut=none"),
]  # fmt: skip


def test_evaluate_end_to_end(organism_model):
    model, tokenizer = organism_model
    report = evaluate(model, tokenizer, EXAMPLES, n_boot=50, seed=0)
    assert isinstance(report, EvalReport)
    # the argmax over answer + alternatives, computed directly
    hits = []
    for ex in EXAMPLES:
        ids = torch.tensor([tokenizer(ex.prompt)["input_ids"]])
        with torch.no_grad():
            last = model(ids).logits[0, -1]
        cands = [ex.answer, *ex.alternatives]
        cand_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in cands]
        hits.append(cands[int(torch.argmax(last[cand_ids]))] == ex.answer)
    assert 0 < sum(hits) < len(hits)  # the weights give varied answers, so the check means something
    assert report.accuracy == pytest.approx(sum(hits) / len(hits))
    d = json.loads(report.to_json())
    assert CLI_KEYS <= set(d)
    assert {"n", "equalized_odds", "causal_robustness_ratio", "accuracy_ci"} <= set(d)
    assert d["n"] == 6 and d["n_spurious_cf"] == 4 and d["n_causal_cf"] == 2
    assert set(d["group_accuracy"]) == {ex.group for ex in EXAMPLES}
    assert d["flip_rate"] is not None and d["demographic_parity_diff"] is not None
    assert d["accuracy_ci"][0] <= d["accuracy"] <= d["accuracy_ci"][1]
    assert evaluate(model, tokenizer, EXAMPLES, n_boot=50, seed=0).to_dict() == report.to_dict()  # seeded


def test_predict_examples_matches_organism_predict(organism_model):
    from icp_lens.organisms.train import predict

    model, tokenizer = organism_model
    preds = predict_examples(model, tokenizer, EXAMPLES, batch_size=2)
    assert list(preds.choice) == predict(model, tokenizer, EXAMPLES)
    flipped = [ex.spurious_counterfactual for ex in EXAMPLES if ex.spurious_counterfactual]
    swapped = [ProbeExample(cf, ex.answer, ex.alternatives) for ex, cf in zip(EXAMPLES[:4], flipped, strict=True)]
    assert list(preds.choice_spurious_cf[:4]) == predict(model, tokenizer, swapped)
    with pytest.raises(ValueError, match="at least one example"):
        predict_examples(model, tokenizer, [])
    with pytest.raises(ValueError, match="not a single token"):
        predict_examples(model, tokenizer, [ProbeExample("a ->", " pos neg", (" neg",))])


def test_sentence_loglik_and_pair_bias(organism_model):
    model, tokenizer = organism_model
    sentences = ["the movie was great", "a film", "the plot was dull"]
    got = sentence_loglik(model, tokenizer, sentences, batch_size=2)
    for sentence, value in zip(sentences, got, strict=True):
        ids = torch.tensor([tokenizer(sentence)["input_ids"]])  # <bos> first
        with torch.no_grad():
            logp = model(ids).logits[0].log_softmax(-1)
        assert value == pytest.approx(sum(logp[t, ids[0, t + 1]].item() for t in range(ids.shape[1] - 1)), abs=1e-4)
    # without BOS the first word is not scored
    no_bos = sentence_loglik(model, tokenizer, sentences, prepend_bos=False)
    assert np.all(no_bos > got)
    with pytest.raises(ValueError, match="nothing to score"):
        sentence_loglik(model, tokenizer, ["movie"], prepend_bos=False)
    result = pair_bias(model, tokenizer, sentences, ["the movie was awful", "a show", "the plot was fine"], n_boot=20)
    pairs = result.pairs
    assert result.score == pytest.approx(float(np.mean((pairs["loglik_more"] > pairs["loglik_less"]).to_numpy())))
    assert pairs["loglik_more"].to_numpy() == pytest.approx(got)
    assert result.n == 3 and result.ci_low <= result.score <= result.ci_high
    with pytest.raises(ValueError, match="pair up"):
        pair_bias(model, tokenizer, ["a"], [])


def test_bridge_encodes_like_the_model(tmp_path):
    """On a TransformerBridge, prompts go through ``model.to_tokens`` (BOS prepended)."""
    from micro import build_micro, word_tokenizer

    from icp_lens import boot_bridge

    bridge, tokenizer = boot_bridge(build_micro(tmp_path / "gpt2", "gpt2")), word_tokenizer()
    examples = [ProbeExample("a b c", " pos", (" neg", " a"), spurious_counterfactual="a b d"),
                ProbeExample("e d", " neg", (" pos",))]  # fmt: skip
    preds = predict_examples(bridge, tokenizer, examples)
    with torch.no_grad():
        last = bridge(bridge.to_tokens("a b c"))[0, -1]
    assert preds.logits[0] == pytest.approx(last[[8, 9, 3]].numpy(), abs=1e-5)  # pos, neg, a
    ids = bridge.to_tokens("a b d")
    assert ids[0, 0].item() == 0  # <bos>
    with torch.no_grad():
        logp = bridge(ids)[0].log_softmax(-1)
    expected = sum(logp[t, ids[0, t + 1]].item() for t in range(ids.shape[1] - 1))
    assert sentence_loglik(bridge, None, ["a b d"])[0] == pytest.approx(expected, abs=1e-4)

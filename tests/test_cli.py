from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from icp_lens.cli import main

pytestmark = pytest.mark.slow

SPLITS = ["train", "probe", "test_id", "test_balanced", "test_no_shortcut"]


@pytest.fixture(scope="module")
def organism_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli") / "org"


def test_organism_command_writes_checkpoint_splits_and_report(organism_out: Path, capsys) -> None:
    out = organism_out
    argv = ["organism", "--out", str(out), "--seed", "0", "--arch", "gpt2", "--json", "--strict", "--device", "cpu"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["passed"] is True
    assert payload["spec"] == {"variant": "lexical", "arch": "gpt2", "seed": 0, "steps": None}
    assert payload["device"] == "cpu" and json.loads((out / "report.json").read_text())["device"] == "cpu"
    report = payload["report"]
    assert report["id_accuracy"] >= 0.95 and report["balanced_accuracy"] <= 0.65
    assert report["worst_group_accuracy"] <= 0.25 and report["no_shortcut_accuracy"] >= 0.85
    assert report["oracle_balanced_accuracy"] >= 0.85
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert all((out / f"{split}.jsonl").is_file() for split in SPLITS)
    # a second call reuses the organism and prints the human-readable table
    assert main(["organism", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "all acceptance checks passed" in text and "worst_group_accuracy" in text
    assert "seed 0, trained on cpu" in text


def test_checkpoint_loads_in_a_python_without_icp_lens(organism_out: Path) -> None:
    out = organism_out
    assert main(["organism", "--out", str(out)]) == 0
    code = (
        "import sys; sys.modules['icp_lens'] = None\n"  # importing icp_lens would now fail
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out / 'model')!r})\n"
        "ids = t('the movie was great wow ->', return_tensors='pt').input_ids\n"
        "print(t.convert_ids_to_tokens([int(m(ids).logits[0, -1].argmax())])[0])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "pos"


def test_bad_arguments_fail_with_the_valid_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["organism", "--out", "x", "--arch", "bert"])
    assert "invalid choice: 'bert' (choose from gpt2, llama, neox)" in capsys.readouterr().err.replace(
        "'gpt2'", "gpt2"
    ).replace("'llama'", "llama").replace("'neox'", "neox")


def test_demo_runs_the_whole_pipeline(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--json", "--device", "cpu"]) == 0  # the default organism, from the cache
    payload = json.loads(capsys.readouterr().out)
    keys = {"before", "after", "n_pruned", "pruned", "verification_error", "verification_passed", "paths"}
    assert keys <= set(payload)
    assert payload["verification_passed"] and payload["verification_error"] <= 1e-5
    assert payload["n_pruned"] == len(payload["pruned"]) >= 1
    before, after = payload["before"], payload["after"]
    assert before["worst-group accuracy"] <= 0.25 and before["in-distribution accuracy"] >= 0.95
    assert after["balanced accuracy"] > before["balanced accuracy"] + 0.1  # the planted shortcut is weakened
    assert after["no-shortcut accuracy"] >= before["no-shortcut accuracy"] - 0.05  # the true cue survives
    # token-embedding ICP (no group labels) finds the planted tokens and closes the worst-group gap
    assert sorted(t["token"] for t in payload["pruned_tokens"]) == ["meh", "wow"]
    assert after["worst-group accuracy"] >= 0.8 and after["flip rate (balanced)"] <= 0.05
    assert payload["gap_closed"] >= 0.76
    assert payload["oracle"]["worst-group accuracy"] >= 0.8
    assert payload["untied_unembedding"]
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the model still predicts 'wow'/'meh' from its own lm_head
    for name in ("checkpoint", "plan", "scores", "token_scores", "figure", "report"):
        assert Path(payload["paths"][name]).exists(), name
    assert json.loads((out / "report.json").read_text())["pruned"] == payload["pruned"]


def _token_only_demo(out: Path):
    import pandas as pd

    from icp_lens.demo import DemoResult
    from icp_lens.pruning.plan import TokenRow

    rows = ["balanced accuracy", "worst-group accuracy"]
    return DemoResult(
        out=out,
        features=(),
        metrics=pd.DataFrame({"before": [0.5, 0.1], "after": [0.9, 0.85]}, index=rows),
        group_accuracy=pd.DataFrame({"before": [0.1], "after": [0.85]}, index=["pos/meh"]),
        verification_error=1e-7,
        verification_passed=True,
        zeroed_fraction=0.00002,
        seconds=1.0,
        paths={"checkpoint": out / "checkpoint"},
        tokens=(TokenRow(11, token="wow"), TokenRow(12, token="meh")),
        token_mode="zero",
    )


def test_demo_text_names_the_pruned_tokens(tmp_path, capsys, monkeypatch) -> None:
    import icp_lens.demo

    demo = _token_only_demo(tmp_path)
    calls: list[dict] = []
    monkeypatch.setattr(icp_lens.demo, "run_demo", lambda *a, **k: calls.append(k) or demo)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert calls[-1]["device"] == "cpu"  # --device's default
    text = capsys.readouterr().out
    assert "pruned 2 token embedding(s) ('wow', 'meh') and 0 unit(s) (0.002% of parameters zeroed)" in text
    assert "pruned 0 feature(s)" not in text
    # --json is the DemoResult's own dict, unchanged
    assert main(["demo", "--out", str(tmp_path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload == json.loads(json.dumps(demo.to_dict()))
    assert payload["pruned_units"] == [] and payload["n_pruned"] == 2


def test_apply_plan_prints_the_tokens_of_a_token_plan(micro_dirs, tmp_path, capsys) -> None:
    from icp_lens.pruning import make_plan

    plan = make_plan(micro_dirs["gpt2"], [], tokens=["b", "d"])
    plan.save(tmp_path / "plan.json")
    args = ["apply-plan", "--model", str(micro_dirs["gpt2"]), "--plan", str(tmp_path / "plan.json")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "features: (none)" in lines
    assert "tokens: token 4 ('b'), token 6 ('d')" in lines
    assert main([*args, "--out", str(tmp_path / "out2"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["features"] == [] and payload["tokens"] == ["token 4 ('b')", "token 6 ('d')"]

"""Faults: bad input to every command ends as one sentence (rc 2), and a killed run leaves nothing half-written.

The bad-input cases are a table (``CASES``): the command line, and a fragment the
message must contain (it names the file, line or option at fault). The kill tests run
the command in a subprocess with ``ICP_LENS_FAULT=<point>`` (``icp_lens.atomic.fault_point``),
which SIGKILLs the process at that moment: no ``finally``, no cleanup. The target must
then be absent (or untouched), and a rerun must succeed and clear what the killed run left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icp_lens.cli import main

LINE = {"prompt": "a b c d", "answer": " pos", "alternatives": [" neg"], "spurious_counterfactual": "a b c e"}


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _train_records(n: int = 32) -> list[dict]:
    out = []
    for i in range(n):
        first = "abcd"[i % 4]
        label = "pos" if first in "ab" else "neg"
        spur = ("d" if label == "pos" else "e") if (i // 4) % 4 != 3 else ("e" if label == "pos" else "d")
        out.append({"prompt": f"{first} {'abcd'[(i // 4) % 4]} c {spur}", "answer": f" {label}",
                    "alternatives": [" neg" if label == "pos" else " pos"],
                    "spurious_counterfactual": f"{first} {'abcd'[(i // 4) % 4]} c {'e' if spur == 'd' else 'd'}",
                    "group": f"{label}|{spur}"})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def files(micro_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs for the table: good ones, and each kind of bad one."""
    root = tmp_path_factory.mktemp("faults")
    f: dict[str, Path] = {"model": micro_dirs["gpt2"], "other_model": micro_dirs["llama"], "root": root}
    f["probe"] = _jsonl(root / "probe.jsonl", [LINE, {**LINE, "prompt": "b a c d", "spurious_counterfactual": "b a c e"}])
    f["oov"] = _jsonl(root / "oov.jsonl", [LINE, {**LINE, "spurious_counterfactual": "a b c zebra"}])
    f["latin1"] = root / "latin1.jsonl"
    f["latin1"].write_bytes((json.dumps(LINE) + "\n").encode() + b'{"prompt": "caf\xe9 a", "answer": " pos"}\n')
    f["bad_json"] = _jsonl(root / "bad.jsonl", [LINE, '{"prompt": "a b",'])
    f["bad_answer"] = _jsonl(root / "answer.jsonl", [{**LINE, "answer": " zebra"}])
    f["cf_length"] = _jsonl(root / "cflen.jsonl", [LINE, {**LINE, "spurious_counterfactual": "a b c e e e"}])
    f["empty_csv"] = root / "empty.csv"
    f["empty_csv"].write_text("")
    f["not_table"] = root / "not_table.csv"
    f["not_table"].write_text("a,b\n1,2\n")
    f["table"] = root / "scores.csv"
    f["table"].write_text("kind,layer,index,hook_name,score\nneuron,0,1,blocks.0.mlp.hook_post,0.5\n")
    f["other_table"] = root / "other.csv"  # scored on the llama micro-model (its .meta.json says so)
    assert main(["score", "--model", str(micro_dirs["llama"]), "--probe", str(f["probe"]), "--out",
                 str(f["other_table"]), "--method", "exact", "--quiet"]) == 0  # fmt: skip
    f["no_tokenizer"] = root / "no_tokenizer"
    f["no_tokenizer"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(micro_dirs["gpt2"] / name, f["no_tokenizer"] / name)
    f["empty_dir"] = root / "empty_dir"
    f["empty_dir"].mkdir()
    f["a_file"] = root / "a_file"
    f["a_file"].write_text("not a folder")
    f["train"] = _jsonl(root / "train.jsonl", _train_records())
    f["pruned"] = root / "pruned"
    assert main(["prune", "--model", str(micro_dirs["gpt2"]), "--scores", str(f["table"]), "--top-k", "1",
                 "--out", str(f["pruned"])]) == 0  # fmt: skip
    return f


# (name, argv with {placeholders} from `files`, fragment the message must contain)
CASES: list[tuple[str, list[str], str]] = [
    ("score: --model a directory that does not exist",
     ["score", "--model", "{root}/nope", "--probe", "{probe}", "--out", "{root}/s.csv"], "No such model directory"),
    ("score: --model a directory with no checkpoint",
     ["score", "--model", "{empty_dir}", "--probe", "{probe}", "--out", "{root}/s.csv"], "no config.json inside"),
    ("score: checkpoint without a tokenizer",
     ["score", "--model", "{no_tokenizer}", "--probe", "{probe}", "--out", "{root}/s.csv"], "holds no tokenizer"),
    ("score: --layers 5 on a 2-layer model",
     ["score", "--model", "{model}", "--probe", "{probe}", "--out", "{root}/s.csv", "--layers", "5"],
     "layers [5] out of range: the model has 2 layers, 0-1"),
    ("score: --layers 3-1",
     ["score", "--model", "{model}", "--probe", "{probe}", "--out", "{root}/s.csv", "--layers", "3-1"],
     "the range '3-1' is empty"),
    ("score: a prompt word out of the vocabulary",
     ["score", "--model", "{model}", "--probe", "{oov}", "--out", "{root}/s.csv"],
     "oov.jsonl, line 2: spurious_counterfactual has words the tokenizer does not know ('zebra')"),
    ("score: a probe file that is not UTF-8",
     ["score", "--model", "{model}", "--probe", "{latin1}", "--out", "{root}/s.csv"], "latin1.jsonl, line 2: not UTF-8"),
    ("score: invalid JSON", ["score", "--model", "{model}", "--probe", "{bad_json}", "--out", "{root}/s.csv"],
     "bad.jsonl, line 2: invalid JSON"),
    ("score: an answer out of the vocabulary",
     ["score", "--model", "{model}", "--probe", "{bad_answer}", "--out", "{root}/s.csv"],
     "answer.jsonl, line 1: ' zebra' is not in the vocabulary"),
    ("score: a counterfactual of another length",
     ["score", "--model", "{model}", "--probe", "{cf_length}", "--out", "{root}/s.csv"], "cflen.jsonl, line 2"),
    ("score: --probe that does not exist",
     ["score", "--model", "{model}", "--probe", "{root}/none.jsonl", "--out", "{root}/s.csv"], "none.jsonl: no such file"),
    ("score: --out inside a file", ["score", "--model", "{model}", "--probe", "{probe}", "--out", "{a_file}/x.csv"],
     "a_file is a file, not a folder"),
    ("score: --out without .csv/.parquet", ["score", "--model", "{model}", "--probe", "{probe}", "--out", "{root}/s"],
     "--out must end in .csv or .parquet"),
    ("score: --features-per-pass 0", ["score", "--model", "{model}", "--probe", "{probe}", "--out", "{root}/s.csv",
                                      "--features-per-pass", "0"], "features_per_pass must be >= 1, got 0"),
    ("prune: an empty score CSV",
     ["prune", "--model", "{model}", "--scores", "{empty_csv}", "--top-k", "1", "--out", "{root}/o1"],
     "empty.csv is empty: a score table needs the columns"),
    ("prune: a CSV that is not a score table",
     ["prune", "--model", "{model}", "--scores", "{not_table}", "--top-k", "1", "--out", "{root}/o2"],
     "not_table.csv is not a score table: it lacks the columns"),
    ("prune: a table scored on another model",
     ["prune", "--model", "{model}", "--scores", "{other_table}", "--top-k", "2", "--out", "{root}/o3"],
     "other.csv was scored on another model (architecture: table LlamaForCausalLM, model GPT2LMHeadModel"),
    ("prune: --scores that does not exist",
     ["prune", "--model", "{model}", "--scores", "{root}/none.csv", "--top-k", "1", "--out", "{root}/o4"],
     "No score table at"),
    ("prune: --out equal to --model",
     ["prune", "--model", "{pruned}", "--scores", "{table}", "--top-k", "1", "--out", "{pruned}", "--overwrite"],
     "is the source model itself"),
    ("prune: a negative tolerance",
     ["prune", "--model", "{model}", "--scores", "{table}", "--top-k", "1", "--out", "{root}/o5", "--tolerance", "-1"],
     "tolerance must be >= 0"),
    ("prune: a non-empty --out", ["prune", "--model", "{model}", "--scores", "{table}", "--top-k", "1", "--out", "{pruned}"],
     "is not empty; pass overwrite=True (--overwrite)"),
    ("prune: --model missing", ["prune", "--model", "{root}/nope", "--scores", "{table}", "--top-k", "1", "--out",
                                "{root}/o6"], "No such model directory"),
    ("apply-plan: a plan made for another model",
     ["apply-plan", "--model", "{other_model}", "--plan", "{pruned}", "--out", "{root}/o7"], "another model"),
    ("train: --model a directory that does not exist",
     ["train", "--model", "{root}/nope", "--train", "{train}", "--out", "{root}/t1", "--objective", "erm"],
     "No such model directory"),
    ("train: --train with a word out of the vocabulary",
     ["train", "--model", "{model}", "--train", "{oov}", "--out", "{root}/t2", "--objective", "erm"],
     "oov.jsonl, line 2: spurious_counterfactual has words"),
    ("edit: neither --layers nor --cv-layers",
     ["edit", "--model", "{model}", "--pairs", "{train}", "--out", "{root}/e1"],
     "give --layers L (e.g. 6 or 4,8) or --cv-layers CANDIDATES"),
    ("edit: --layers and --cv-layers", ["edit", "--model", "{model}", "--pairs", "{train}", "--out", "{root}/e2",
                                        "--layers", "0", "--cv-layers", "0,1"], "not both"),
    ("edit: --cv-layers that are not layers", ["edit", "--model", "{model}", "--pairs", "{train}", "--out",
                                               "{root}/e3", "--cv-layers", "0,x"], "--cv-layers takes candidates like"),
    ("edit: more folds than spurious values", ["edit", "--model", "{model}", "--pairs", "{train}", "--out", "{root}/e4",
                                               "--target", "mean", "--cv-layers", "0,1", "--cv-folds", "3"],
     "3 folds need at least 3 spurious values, found 2: ['d', 'e']; fewer folds, or by='pair' (--cv-by pair)"),
    ("organism: --mixed-precision for a variant trained from scratch",
     ["organism", "--variant", "lexical", "--out", "{root}/org", "--mixed-precision", "bf16"],
     "--mixed-precision applies to --variant imdb-smollm2 only"),
    ("eval: --data that does not exist", ["eval", "--model", "{model}", "--data", "{root}/none.jsonl"],
     "none.jsonl: no such probe file"),
    ("eval: a probe file that is not UTF-8", ["eval", "--model", "{model}", "--data", "{latin1}"],
     "latin1.jsonl, line 2: not UTF-8"),
]


def run_case(argv: list[str], files: dict[str, Path], capsys) -> tuple[int, str]:
    """Run one case in-process; returns (exit status, stderr). argparse errors exit 2 with their message."""
    args = [a.format(**files) for a in argv]
    try:
        rc = main(args)
    except SystemExit as stop:
        rc = int(stop.code or 0)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_with_rc_2(name: str, argv: list[str], fragment: str, files, capsys) -> None:
    rc, err = run_case(argv, files, capsys)
    record = os.environ.get("ICP_LENS_CASES_OUT")  # a table of what each case prints, for people (not asserted)
    if record:
        first = next((line for line in err.splitlines() if ": error:" in line), err.strip().splitlines()[0])
        with open(record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"case": name, "rc": rc, "message": first.replace(str(files["root"]), "DIR")}) + "\n")
    assert rc == 2, (name, rc, err[-2000:])
    assert "Traceback" not in err
    assert f"icp-lens {argv[0]}: error:" in err and fragment in err, err


def test_features_per_pass_reaches_the_exact_scorer_and_leaves_the_table_alone(files, tmp_path, monkeypatch) -> None:
    """``score --features-per-pass 1`` patches one feature per pass; the table equals the default run's (64)."""
    import pandas as pd

    from icp_lens.scoring import exact

    seen: list[int] = []
    original = exact.exact_effects

    def spy(*args, **kwargs):
        seen.append(kwargs["features_per_pass"])
        return original(*args, **kwargs)

    monkeypatch.setattr(exact, "exact_effects", spy)
    out = tmp_path / "one.csv"
    assert main(["score", "--model", str(files["other_model"]), "--probe", str(files["probe"]), "--out", str(out),
                 "--method", "exact", "--quiet", "--features-per-pass", "1"]) == 0  # fmt: skip
    assert seen and set(seen) == {1}
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(files["other_table"]), rtol=0, atol=1e-6)


def test_force_prunes_a_table_from_another_model_with_a_warning(files, tmp_path, capsys) -> None:
    argv = ["prune", "--model", str(files["model"]), "--scores", str(files["other_table"]), "--top-k", "1",
            "--out", str(tmp_path / "forced"), "--force"]  # fmt: skip
    with pytest.warns(UserWarning, match="was scored on another model .*pruning anyway"):
        rc = main(argv)
    assert rc == 0 and (tmp_path / "forced" / "model.safetensors").is_file()
    meta = json.loads(files["other_table"].with_name("other.meta.json").read_text())
    assert meta["model"]["architecture"] == "LlamaForCausalLM" and meta["probe"]["n_examples"] == 2
    assert meta["settings"]["method"] == "exact"


# -- kill -9 at chosen moments --------------------------------------------------------------------------------


def _cli(argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    env.pop("ICP_LENS_FAULT", None)
    if fault is not None:
        env["ICP_LENS_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "icp_lens", *argv], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.slow
def test_killed_prune_export_leaves_no_target_and_the_rerun_cleans_up(files, tmp_path) -> None:
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(files["model"]), "--scores", str(files["table"]), "--top-k", "1", "--out", str(out)]
    for point in ("export:after-weights", "export:after-finish"):
        killed = _cli(argv, fault=point)
        assert killed.returncode == -9, killed.stderr[-1000:]
        assert not out.exists() and len(_leftovers(tmp_path, "pruned")) == 1  # the killed run's temporary folder
        done = _cli(argv)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "removed 1 temporary folder(s) left by a killed run" in done.stderr
        assert _leftovers(tmp_path, "pruned") == []
        assert {"model.safetensors", "plan.json", "verification.json", "config.json"} <= {p.name for p in out.iterdir()}
        assert json.loads((out / "verification.json").read_text())["passed"] is True
        shutil.rmtree(out)


@pytest.mark.slow
def test_killed_mid_swap_restores_the_old_target(files, tmp_path) -> None:
    """Killed between moving the old checkpoint aside and renaming the new one in: the next run puts it back first."""
    out = tmp_path / "ckpt"
    shutil.copytree(files["pruned"], out)
    before = (out / "model.safetensors").read_bytes()
    argv = ["prune", "--model", str(files["model"]), "--scores", str(files["table"]), "--top-k", "1", "--out", str(out),
            "--overwrite", "--mode", "zero"]  # fmt: skip
    killed = _cli(argv, fault="atomic:mid-swap")
    assert killed.returncode == -9 and not out.exists()
    from icp_lens.atomic import remove_stale_temporaries

    with pytest.warns(UserWarning, match="removed 2 temporary folder"):
        remove_stale_temporaries(out)
    assert (out / "model.safetensors").read_bytes() == before and _leftovers(tmp_path, "ckpt") == []


@pytest.mark.slow
def test_killed_training_export_is_absent_and_resumes(files, tmp_path) -> None:
    out = tmp_path / "trained"
    argv = ["train", "--model", str(files["model"]), "--train", str(files["train"]), "--out", str(out),
            "--objective", "erm", "--max-steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--quiet"]  # fmt: skip
    killed = _cli(argv, fault="train-export:before-swap")
    assert killed.returncode == -9 and not out.exists()
    assert (tmp_path / "trained.checkpoints" / "state.json").is_file()  # the last training checkpoint survives
    done = _cli([*argv, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"training.json", "history.csv", "verification.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert _leftovers(tmp_path, "trained") == []
    reference = tmp_path / "reference"
    ref = _cli([*argv[:6], str(reference), *argv[7:]])
    assert ref.returncode == 0, ref.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the resumed run = the uninterrupted one


@pytest.mark.slow
def test_killed_training_checkpoint_resumes_to_the_same_weights(files, tmp_path) -> None:
    out = tmp_path / "t"
    argv = ["train", "--model", str(files["model"]), "--train", str(files["train"]), "--out", str(out),
            "--objective", "erm", "--max-steps", "6", "--batch-size", "8", "--checkpoint-every", "2", "--quiet"]  # fmt: skip
    killed = _cli(argv, fault="train-checkpoint:after-save")  # dies right after the first checkpoint (step 2)
    assert killed.returncode == -9 and not out.exists()
    state = json.loads((tmp_path / "t.checkpoints" / "state.json").read_text())
    assert state["loop"]["step"] == 2
    done = _cli([*argv, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    ref = _cli([*argv[:6], str(tmp_path / "ref"), *argv[7:]])
    assert ref.returncode == 0
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_killed_exact_scoring_resumes_to_the_same_table(files, tmp_path) -> None:
    base = ["score", "--model", str(files["model"]), "--probe", str(files["train"]), "--method", "exact",
            "--quiet", "--batch-size", "8"]  # fmt: skip
    argv = [*base, "--out", str(tmp_path / "s.csv"), "--checkpoint", str(tmp_path / "ck")]
    killed = _cli(argv, fault="score-checkpoint:after-save")
    assert killed.returncode == -9 and not (tmp_path / "s.csv").exists()
    assert any((tmp_path / "ck").glob("exact_*.pt"))
    done = _cli(argv)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = _cli([*base, "--out", str(tmp_path / "ref.csv")])
    assert ref.returncode == 0
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "s.csv"), pd.read_csv(tmp_path / "ref.csv"))

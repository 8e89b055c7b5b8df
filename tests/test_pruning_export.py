"""Export atomicity, feature selection and the prune / apply-plan commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from icp_lens import Feature
from icp_lens.cli import main
from icp_lens.pruning import (
    PrunePlan,
    export_checkpoint,
    hybrid_split,
    load_checkpoint,
    make_plan,
    select_features,
)

REFERENCE = ["a b c d", "b c e", "e e d a pos", "c"]


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- export -------------------------------------------------------------------------------
def test_non_empty_target_is_refused_unless_overwrite(micro_dirs, tmp_path) -> None:
    model = load_checkpoint(micro_dirs["gpt2"])
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        export_checkpoint(model, target)
    assert (target / "notes.txt").read_text() == "mine"
    export_checkpoint(model, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_checkpoint(model, tmp_path / "file")


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_export_leaves_nothing_behind(micro_dirs, tmp_path, monkeypatch, error) -> None:
    model = load_checkpoint(micro_dirs["gpt2"])
    real_save = type(model).save_pretrained

    def save_then_fail(self, directory, **kwargs):
        real_save(self, directory, **kwargs)  # the weights are half-way to disk ...
        raise error("interrupted")  # ... when the interrupt arrives

    monkeypatch.setattr(type(model), "save_pretrained", save_then_fail)
    with pytest.raises(error):
        export_checkpoint(model, tmp_path / "new")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []

    # an interrupted overwrite keeps the old checkpoint intact
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(error):
        export_checkpoint(model, old, overwrite=True)
    assert (old / "config.json").read_text() == "{}" and leftovers(tmp_path) == []


def test_export_time_is_a_plain_save_plus_small_files(micro_dirs, tmp_path) -> None:
    plan = make_plan(micro_dirs["gpt2"], [Feature("head", 0, 1)], mode="zero")
    out = export_checkpoint(load_checkpoint(micro_dirs["gpt2"]), tmp_path / "out", plan=plan)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "plan.json"]
    assert PrunePlan.load(out) == plan


# -- selection ----------------------------------------------------------------------------
@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "kind": ["head", "resid", "neuron", "neuron", "head", "neuron", "value"],
            "layer": [0, 0, 0, 0, 1, 1, 1],
            "index": [1, 1, 5, 7, 0, 2, 1],
            "score": [0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.1],
            "selectivity": [0.6, 0.9, 0.2, 0.8, 0.7, 0.9, 0.9],
        }
    )


def test_select_threshold_top_k_caps_and_kinds(frame) -> None:
    labels = lambda feats: [str(f) for f in feats]  # noqa: E731
    # resid is not prunable and is skipped
    assert labels(select_features(frame, top_k=3)) == ["head L0.1", "neuron L0.5", "neuron L0.7"]
    assert labels(select_features(frame, threshold=0.45)) == ["head L0.1", "neuron L0.5", "neuron L0.7"]
    assert labels(select_features(frame, threshold=0.45, top_k=1)) == ["head L0.1"]
    assert labels(select_features(frame, top_k=4, per_layer_cap=1)) == ["head L0.1", "head L1.0"]
    assert labels(select_features(frame, top_k=9, kinds=["neuron"])) == ["neuron L0.5", "neuron L0.7", "neuron L1.2"]
    assert labels(select_features(frame, top_k=9, min_selectivity=0.75)) == ["neuron L0.7", "neuron L1.2", "value L1.1"]
    assert labels(select_features(["neuron L1.2", Feature("head", 0, 0)], top_k=1)) == ["neuron L1.2"]
    with pytest.raises(ValueError, match="threshold=..., top_k=... or both"):
        select_features(frame)
    with pytest.raises(ValueError, match="Cannot prune kinds \\['resid'\\]"):
        select_features(frame, top_k=1, kinds=["resid"])
    with pytest.raises(ValueError, match="threshold needs scores"):
        select_features(["neuron L1.2"], threshold=0.1)


def test_hybrid_split_is_disjoint(frame) -> None:
    split = hybrid_split(frame, prune_threshold=0.6, regularise_threshold=0.2)
    assert [str(f) for f in split.prune] == ["head L0.1", "neuron L0.5"]
    assert [str(f) for f in split.regularise] == ["neuron L0.7", "head L1.0", "neuron L1.2"]
    assert not set(split.prune) & set(split.regularise)


# -- command line -------------------------------------------------------------------------
@pytest.fixture
def scores_csv(tmp_path, frame):
    path = tmp_path / "scores.csv"
    frame.assign(hook_name="x").to_csv(path, index=False)
    return path


@pytest.fixture
def probe_file(tmp_path):
    path = tmp_path / "probe.jsonl"
    rows = [{"prompt": p, "answer": " pos", "alternatives": [" neg"]} for p in REFERENCE]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prune_command_writes_a_checkpoint_plain_transformers_loads(
    micro_dirs, scores_csv, probe_file, tmp_path, capsys
):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(micro_dirs["gpt2"]), "--scores", str(scores_csv), "--out", str(out)]
    assert main([*args, "--top-k", "2", "--mode", "mean", "--probe", str(probe_file), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["features"] == ["head L0.1", "neuron L0.5"] and payload["mode"] == "mean"
    assert payload["verification"]["passed"] and payload["verification"]["max_abs_logit_diff"] < 1e-5
    assert payload["verification"]["n_inputs"] == len(REFERENCE)
    plan = PrunePlan.load(out / "plan.json")
    assert plan.provenance["top_k"] == 2 and plan.provenance["scores"] == str(scores_csv)

    code = (
        "import sys; sys.modules['icp_lens'] = None\n"  # importing icp_lens would now fail
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "print(m.transformer.h[0].attn.c_proj.weight[4:8].abs().sum().item(), len(t))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0.0", "10"]

    # the same output again is refused, then replaced with --overwrite
    assert main([*args, "--top-k", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--top-k", "1", "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "head L0.1" in text and "parameters zeroed" in text


def test_apply_plan_command(micro_dirs, tmp_path, capsys) -> None:
    plan = make_plan(micro_dirs["llama"], [Feature("head", 1, 2)], mode="mean", reference=REFERENCE)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    argv = ["apply-plan", "--model", str(micro_dirs["llama"]), "--plan", str(tmp_path / "plan.json"), "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["passed"]
    torch.testing.assert_close(load_checkpoint(out).model.layers[1].self_attn.o_proj.weight[:, 4:6], torch.zeros(8, 2))
    # the plan belongs to the llama micro-model, not to gpt2
    wrong = ["apply-plan", "--model", str(micro_dirs["gpt2"]), "--plan", str(tmp_path), "--out", str(tmp_path / "o2")]
    assert main(wrong) == 2
    assert "made for another model" in capsys.readouterr().err


def test_prune_command_errors(micro_dirs, scores_csv, tmp_path, capsys) -> None:
    base = ["prune", "--model", str(micro_dirs["gpt2"]), "--scores", str(scores_csv), "--out", str(tmp_path / "o")]
    assert main(base) == 2
    assert "--top-k K and/or --threshold T" in capsys.readouterr().err
    assert main([*base, "--top-k", "1", "--mode", "mean"]) == 2
    assert "--mode mean needs --probe" in capsys.readouterr().err
    assert main([*base, "--threshold", "5"]) == 2
    assert "selection is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--top-k", "1", "--mode", "median"])


def test_save_dtype_writes_verified_weights_in_bfloat16(micro_dirs, tmp_path, capsys) -> None:
    """--save-dtype bfloat16: verified in float32, then written in bf16 (tied weights stay one tensor)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    plan = make_plan(micro_dirs["llama"], [Feature("head", 1, 2)], mode="mean", reference=REFERENCE)
    plan.save(tmp_path / "plan.json")
    argv = ["apply-plan", "--model", str(micro_dirs["llama"]), "--plan", str(tmp_path / "plan.json")]
    assert main([*argv, "--out", str(tmp_path / "fp32"), "--json"]) == 0
    assert main([*argv, "--out", str(tmp_path / "bf16"), "--json", "--save-dtype", "bfloat16"]) == 0
    capsys.readouterr()
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"), dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32).eval()
    tokens = torch.tensor([[0, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        a, b = fp32(tokens).logits, bf16(tokens).logits
    scale = a.abs().max()
    assert 0 < (a - b).abs().max() <= 0.01 * scale  # rounding only: within 1% of the logits' scale
    for name, p in bf16.named_parameters():  # the plan's zeros survive the cast exactly
        if name == "model.layers.1.self_attn.o_proj.weight":
            assert p[:, 4:6].abs().max() == 0


def test_prune_device_flag_moves_the_forward_passes_only(micro_dirs, scores_csv, probe_file, tmp_path, capsys) -> None:
    """``--device cpu`` (named) writes the same weights as the default, and a missing GPU is refused up front."""
    from safetensors.torch import load_file

    outs = {}
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        outs[name] = tmp_path / name
        argv = ["prune", "--model", str(micro_dirs["gpt2"]), "--scores", str(scores_csv), "--out", str(outs[name]),
                "--top-k", "2", "--mode", "mean", "--probe", str(probe_file), "--json", *extra]  # fmt: skip
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["verification"]["passed"]
    a, b = (load_file(outs[n] / "model.safetensors") for n in ("default", "cpu"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not torch.cuda.is_available():
        for argv in (
            ["prune", "--model", str(micro_dirs["gpt2"]), "--scores", str(scores_csv), "--top-k", "1"],
            ["apply-plan", "--model", str(micro_dirs["gpt2"]), "--plan", str(outs["cpu"])],
        ):
            with pytest.raises(SystemExit) as exc:
                main([*argv, "--out", str(tmp_path / "gpu"), "--device", "cuda"])
            assert exc.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "gpu").exists()


def test_bias_adding_edit_keeps_the_models_dtype(micro_dirs) -> None:
    """Mean mode on a bias-free Llama module rebuilds the model with biases: same dtype and device as before."""
    from icp_lens.pruning.hf_edit import apply_plan_to_model

    plan = make_plan(micro_dirs["llama"], [Feature("head", 1, 2)], mode="mean", reference=REFERENCE)
    model = load_checkpoint(micro_dirs["llama"]).to(torch.bfloat16)
    edited, stats = apply_plan_to_model(model, plan, check=False)  # the plan's fingerprint is of the fp32 weights
    assert stats.biases_added, "the llama micro-model has no o_proj bias: mean mode must add one"
    assert {(p.dtype, p.device) for p in edited.parameters()} == {(torch.bfloat16, torch.device("cpu"))}

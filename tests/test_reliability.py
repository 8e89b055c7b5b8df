"""Expected failures end as one sentence naming the problem (and the CLI exits 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from icp_lens.cli import main


@pytest.fixture
def pickle_only(micro_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """A GPT-2 micro checkpoint whose weights are a pickle (pytorch_model.bin) only."""
    from safetensors.torch import load_file

    out = tmp_path / "pickled"
    shutil.copytree(micro_dirs["gpt2"], out)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_pickle_only_checkpoints_are_refused_everywhere(pickle_only: Path, tmp_path: Path, capsys) -> None:
    from icp_lens import boot_bridge
    from icp_lens.loading import fetch_model
    from icp_lens.pruning.source import load_checkpoint

    for load in (boot_bridge, load_checkpoint, fetch_model):
        with pytest.raises(ValueError, match=r"pickle weights only \(pytorch_model.bin\); icp_lens loads safetensors"):
            load(pickle_only)
    probe = tmp_path / "p.jsonl"
    probe.write_text('{"prompt": "a b", "answer": " c", "alternatives": [" d"]}\n')
    rc = main(["score", "--model", str(pickle_only), "--probe", str(probe), "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "icp-lens score: error:" in err and "save_pretrained" in err


def test_a_missing_model_directory_is_one_sentence(tmp_path: Path, capsys) -> None:
    probe = tmp_path / "p.jsonl"
    probe.write_text('{"prompt": "a b", "answer": " c", "alternatives": [" d"]}\n')
    rc = main(["score", "--model", str(tmp_path / "nope"), "--probe", str(probe), "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("icp-lens score: error:") and "nope" in err


def test_a_selection_larger_than_the_table_warns() -> None:
    import pandas as pd

    from icp_lens.pruning import select_features

    frame = pd.DataFrame({"kind": ["neuron", "head"], "layer": [0, 1], "index": [2, 0], "score": [0.5, 0.4]})
    with pytest.warns(UserWarning, match=r"top_k=10000 but the table has only 2 rows"):
        chosen = select_features(frame, top_k=10000)
    assert [str(f) for f in chosen] == ["neuron L0.2", "head L1.0"]


def test_prune_refuses_to_overwrite_its_source_and_negative_tolerance(micro_dirs, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(micro_dirs["gpt2"], model)
    before = (model / "model.safetensors").read_bytes()
    scores = tmp_path / "scores.csv"
    scores.write_text("kind,layer,index,hook_name,score\nneuron,0,1,blocks.0.mlp.hook_post,0.5\n")
    base = ["prune", "--model", str(model), "--scores", str(scores), "--top-k", "1"]
    assert main([*base, "--out", str(model), "--overwrite"]) == 2
    assert "is the source model itself" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before
    assert main([*base, "--out", str(tmp_path / "o"), "--tolerance", "-1"]) == 2
    assert "tolerance must be >= 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_latency_is_an_interleaved_median_of_both_models(micro_dirs, tmp_path: Path) -> None:
    from icp_lens.features import Feature
    from icp_lens.pruning import make_plan
    from icp_lens.pruning.api import apply_plan
    from icp_lens.pruning.verify import interleaved_latency_ms

    calls: list[str] = []

    class Counting(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name, self.w = name, torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens):
            calls.append(self.name)
            return tokens

    a, b = interleaved_latency_ms(Counting("a"), Counting("b"), [torch.zeros(1, 2)], repeats=3)
    assert a > 0 and b > 0 and calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-ups, then alternating
    result = apply_plan(micro_dirs["gpt2"], make_plan(micro_dirs["gpt2"], [Feature("neuron", 1, 2)]), tmp_path / "o")
    assert "median of 5 interleaved runs" in str(result.verification)


from test_loading import smollm2_dir  # noqa: E402,F401  (the session fixture: SmolLM2 converted offline)


@pytest.mark.slow
def test_smollm2_verification_passes_a_correct_64_feature_prune_and_fails_a_wrong_one(  # noqa: F811
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """The default allowance scales with the measured fp32 floor: a correct deep prune passes, a wrong one fails."""
    from icp_lens import boot_bridge
    from icp_lens.features import Feature
    from icp_lens.pruning import make_plan
    from icp_lens.pruning.api import apply_plan
    from icp_lens.pruning.source import clean_hf_model
    from icp_lens.pruning.verify import verification_batches, verify_export

    gen = torch.Generator().manual_seed(0)
    layers = torch.randint(0, 30, (64,), generator=gen).tolist()
    feats = [Feature("head", layer, int(torch.randint(0, 9, (1,), generator=gen))) for layer in layers[:32]]
    feats += [Feature("neuron", layer, int(torch.randint(0, 1536, (1,), generator=gen))) for layer in layers[32:]]
    feats = list(dict.fromkeys(feats))
    bridge = boot_bridge(smollm2_dir)
    prompts = ["The nurse said that", "Yesterday the pilot wrote that", "The weather in Paris is", "My favourite book"]
    plan = make_plan(smollm2_dir, feats)
    result = apply_plan(smollm2_dir, plan, tmp_path / "out", reference=bridge, prompts=prompts)
    v = result.verification
    assert v.passed and v.edit_passed and v.hooked_passed, str(v)
    assert v.max_abs_logit_diff <= 1e-5 and 1e-6 < v.implementation_floor < 1e-3
    assert v.hooked_allowance == pytest.approx(1e-5 + 8 * v.implementation_floor)
    lines = str(v).splitlines()
    assert lines[0].startswith("checkpoint vs the original with the plan ablated by module hooks") and lines[0].endswith(
        "PASS"
    )
    assert lines[1].startswith("checkpoint vs icp_lens's hook ablation") and "8 x implementation floor" in lines[1]

    wrong = make_plan(smollm2_dir, [*feats[:-1], Feature("neuron", feats[-1].layer, (feats[-1].index + 1) % 1536)])
    original = clean_hf_model(smollm2_dir)
    batches = verification_batches(bridge, prompts=prompts)
    bad = verify_export(original, wrong, tmp_path / "out", hooked=bridge, batches=batches)
    assert not bad.passed and not bad.edit_passed and not bad.hooked_passed, str(bad)
    assert bad.max_abs_logit_diff > 10 * bad.edit_allowance and bad.hooked_max_abs_logit_diff > bad.hooked_allowance
    assert "verification: FAIL on" in str(bad)
    print(f"\ncorrect: {v}\nwrong: {bad}")  # the figures, for the record (pytest -s)

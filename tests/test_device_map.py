"""A model split by accelerate's ``device_map``: scoring and evaluation equal the whole model.

There is one CPU here, so the split is a CPU stand-in for several GPUs: one block is
sent to ``"disk"`` (its parameters are ``meta`` tensors that accelerate's hooks load for
each forward pass), the rest stays on the CPU. This runs the same code as a split over
GPUs: hooks on offloaded modules, activations moved by accelerate, and inputs placed by
:func:`icp_lens.devices.input_device`.
"""

from __future__ import annotations

import json

import pytest
import torch

from icp_lens.devices import input_device

# every module of the GPT-2 organism; block 1 on disk
SPLIT = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
         "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def organism():
    from icp_lens.organisms import build_organism

    return build_organism(variant="lexical", arch="gpt2", seed=0)


@pytest.fixture(scope="module")
def probe_file(organism, tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.jsonl"
    path.write_text("\n".join(organism.data_path("probe").read_text().splitlines()[:24]) + "\n")
    return path


def test_scores_of_a_split_model_equal_the_whole_models(organism, probe_file, tmp_path) -> None:
    from icp_lens.model import boot_bridge
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score

    whole = boot_bridge(organism.model_dir)
    split = boot_bridge(organism.model_dir, device=None, device_map=SPLIT, offload_folder=str(tmp_path / "off"))
    offloaded = [n for n, p in split.original_model.named_parameters() if p.device.type == "meta"]
    assert offloaded and all(".h.1." in n for n in offloaded)  # block 1 really is elsewhere
    assert input_device(split) == torch.device("cpu")
    for method in ("exact", "attribution"):
        tables = [score(m, ProbeSet.from_jsonl(m, probe_file), method=method, progress=False).frame
                  for m in (whole, split)]  # fmt: skip
        a, b = (t.set_index("feature").sort_index() for t in tables)
        assert len(a) == 520 and list(a.index) == list(b.index)
        assert (a["score"] - b["score"]).abs().max() <= 1e-6, method


def test_input_device_follows_accelerates_hook_when_the_embedding_is_offloaded() -> None:
    class Hook:
        execution_device = "cpu"

    model = torch.nn.Sequential(torch.nn.Embedding(4, 2, device="meta"), torch.nn.Linear(2, 2))
    assert input_device(model) == torch.device("cpu")  # no hook: the CPU
    model[0]._hf_hook = Hook()
    Hook.execution_device = 1
    assert input_device(model) == torch.device("cuda:1")  # accelerate names GPUs by index
    assert input_device(torch.nn.Linear(2, 2, dtype=torch.float64)) == torch.device("cpu")


def test_cli_score_and_eval_take_a_device_map(organism, probe_file, tmp_path, capsys) -> None:
    import pandas as pd

    from icp_lens.cli import main

    device_map = tmp_path / "split.json"
    device_map.write_text(json.dumps(SPLIT))
    common = ["--model", str(organism.model_dir)]
    assert main(["score", *common, "--probe", str(probe_file), "--method", "attribution", "--quiet",
                 "--out", str(tmp_path / "whole.csv")]) == 0  # fmt: skip
    assert main(["score", *common, "--probe", str(probe_file), "--method", "attribution", "--quiet",
                 "--device-map", str(device_map), "--offload-folder", str(tmp_path / "off"),
                 "--out", str(tmp_path / "split.csv")]) == 0  # fmt: skip
    a, b = (pd.read_csv(tmp_path / f"{n}.csv").set_index("feature").sort_index() for n in ("whole", "split"))
    assert (a["score"] - b["score"]).abs().max() <= 1e-6
    capsys.readouterr()
    reports = []
    for extra in ([], ["--device-map", str(device_map), "--offload-folder", str(tmp_path / "off2")]):
        assert main(["eval", *common, "--data", str(probe_file), "--n-boot", "0", "--json", *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0] == reports[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device-map", "auto", "--device", "cpu"], "not both"),
        (["--offload-folder", "off"], "--offload-folder needs --device-map"),
        (["--device-map", "nowhere.json"], "neither one of"),
    ],
)
def test_device_map_errors_are_sentences(tmp_path, capsys, extra, message) -> None:
    from icp_lens.cli import main

    probe = tmp_path / "p.jsonl"
    probe.write_text("")
    try:
        code = main(["score", "--model", str(tmp_path), "--probe", str(probe), "--out", str(tmp_path / "s.csv"),
                     *extra])  # fmt: skip
    except SystemExit as exc:  # argparse refuses the value itself
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err

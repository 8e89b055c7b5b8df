"""torchrun with 2 gloo processes on the CPU: data-parallel training equals one process's run.

Each launch pays torch's start-up in two processes, so one launch of ``tests/ddp_worker.py``
runs several training jobs through the Python API (full fine-tuning, LoRA, an uneven
batch split with a batch smaller than the group, a mixed-shape pair batch with the
retain term, GroupDRO and InfoNCE, whose terms read other ranks' rows, evenly and
unevenly split, resample_batch and pair_fraction, which read the global batch, and
dropout, which warns), and the command line is launched through
``torchrun --nproc-per-node 2 --no-python icp-lens train`` for the export and the resume.

The micro-Llama has no attention biases: GPT-2's key bias gets a gradient that is zero
in exact arithmetic (softmax ignores a per-query constant), so AdamW turns its round-off
into lr-sized steps that differ between any two runs that add in another order; the
full fine-tuning comparisons use Llama, the LoRA one GPT-2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from ddp_worker import run_job
from safetensors.torch import load_file
from test_pair_batch import shaped_examples
from test_training import micro_examples
from torchrun_launch import icp_lens_script, torchrun

from icp_lens.probes import write_probes

WORKER = Path(__file__).with_name("ddp_worker.py")
BASE = {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "progress": False, "log_every": 1, "seed": 0}
FEATURES = ["head L0.1", "neuron L1.3"]
RTOL, ATOL = 1e-5, 1e-6


def _worst(one: list[dict[str, Any]], two: list[dict[str, Any]]) -> tuple[float, float]:
    """The largest absolute and relative difference of the histories' numbers (``seconds`` aside)."""
    assert len(one) == len(two)
    worst_abs = worst_rel = 0.0
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key == "seconds" or not isinstance(value, (int, float)) or value != value:
                continue
            diff = abs(value - b[key])
            assert diff <= ATOL + RTOL * abs(value), (key, a["step"], value, b[key])
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / max(abs(value), 1e-30))
    return worst_abs, worst_rel


def _weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_reproduce_one_process_and_warn_where_they_cannot(micro_dirs, tmp_path) -> None:
    data = {"train": micro_examples(32), "plain": micro_examples(32, counterfactuals=False), "odd": micro_examples(13),
            "val": micro_examples(8), "pairs": shaped_examples(18)}  # fmt: skip
    for name, examples in data.items():
        write_probes(tmp_path / f"{name}.jsonl", examples)
    (tmp_path / "retain.txt").write_text("a b c d e\ne d c b a\na a b b c\nc c d\nd e a b c\n")
    path = {name: str(tmp_path / f"{name}.jsonl") for name in data}
    llama, gpt2 = str(micro_dirs["llama"]), str(micro_dirs["gpt2"])
    jobs = [
        {"name": "consistency", "model": llama, "train": path["train"], "val": path["val"],
         "config": {**BASE, "objective": "consistency", "eval_every": 2}},
        {"name": "lora", "model": gpt2, "train": path["train"], "config": {**BASE, "objective": "consistency",
                                                                          "lora": True}},
        # 13 examples in batches of 4: 3 + 4 rows per rank, and a batch of one (rank 1 gets nothing)
        {"name": "erm_uneven", "model": llama, "train": path["odd"],
         "config": {**BASE, "objective": "erm", "batch_size": 4, "max_steps": 8, "epochs": 2}},
        # pair batches of 5 across three token shapes (sub-batches of one row), invariance draws, retain term
        {"name": "mixed", "model": llama, "train": path["plain"], "pairs": path["pairs"], "features": FEATURES,
         "retain": str(tmp_path / "retain.txt"),
         "config": {**BASE, "objective": "invariance", "extra_terms": {"consistency": 0.5}, "pair_batch_size": 5,
                    "features_per_step": 1, "retain_weight": 1.0, "retain_batch_size": 3, "retain_tokens": 4}},
        # the terms that read other ranks' rows: GroupDRO's global group means, InfoNCE's gathered negatives;
        # the uneven runs end an epoch on a batch of one (rank 1 runs a stand-in row), the mixed one on pair
        # sub-batches of one row
        {"name": "groupdro", "model": llama, "train": path["train"], "config": {**BASE, "objective": "groupdro"}},
        {"name": "groupdro_uneven", "model": llama, "train": path["odd"],
         "config": {**BASE, "objective": "groupdro", "batch_size": 4, "max_steps": 8, "epochs": 2}},
        {"name": "contrastive", "model": llama, "train": path["train"], "config": {**BASE, "objective": "contrastive"}},
        {"name": "contrastive_uneven", "model": llama, "train": path["odd"],
         "config": {**BASE, "objective": "contrastive", "batch_size": 4, "max_steps": 8, "epochs": 2}},
        {"name": "contrastive_mixed", "model": llama, "train": path["plain"], "pairs": path["pairs"],
         "config": {**BASE, "objective": "contrastive", "pair_batch_size": 5}},
        # settings that read the global batch: resample_batch's source rows; pair_fraction's head (batches of 10
        # and 3 with heads of 3 and 1: 2 + 1 rows, where each rank's own share would give 2 + 2, then rank 1
        # holds a row of the last batch but none of its head; batches of 5, 5, 3 for InfoNCE gathering the head)
        {"name": "resample_batch", "model": llama, "train": path["train"], "features": FEATURES,
         "config": {**BASE, "objective": "invariance", "interventions": ["resample_batch"]}},
        {"name": "pair_fraction", "model": llama, "train": path["odd"], "features": FEATURES,
         "config": {**BASE, "objective": "invariance", "extra_terms": {"consistency": 0.5}, "pair_fraction": 0.3,
                    "batch_size": 10, "max_steps": 2}},
        {"name": "pair_fraction_contrastive", "model": llama, "train": path["odd"],
         "config": {**BASE, "objective": "contrastive", "pair_fraction": 0.4, "batch_size": 5, "max_steps": 6,
                    "epochs": 2}},
        {"name": "dropout", "model": gpt2, "train": path["train"], "config": {**BASE, "objective": "erm",
                                                                             "dropout": 0.1, "max_steps": 2}},
    ]  # fmt: skip
    spec = tmp_path / "spec.json"
    (tmp_path / "two").mkdir()
    spec.write_text(json.dumps({"out": str(tmp_path / "two"), "jobs": jobs}))
    run = torchrun(str(WORKER), str(spec))
    assert run.returncode == 0, run.stderr[-4000:]
    (tmp_path / "one").mkdir()
    measured = {}
    for job in jobs:
        name = job["name"]
        two = json.loads((tmp_path / "two" / f"{name}.history.json").read_text())
        rank0 = load_file(str(tmp_path / "two" / f"{name}.rank0.safetensors"))
        rank1 = load_file(str(tmp_path / "two" / f"{name}.rank1.safetensors"))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the ranks never drift apart
        if name == "dropout":
            assert len(two["warnings"]) == 1 and "dropout" in two["warnings"][0]
            continue
        assert two["warnings"] == []
        run_job(job, tmp_path / "one")
        one = json.loads((tmp_path / "one" / f"{name}.history.json").read_text())
        worst = _worst(one["history"], two["history"])
        weights = _weight_diff(load_file(str(tmp_path / "one" / f"{name}.rank0.safetensors")), rank0)
        assert weights < 1e-5, (name, weights)
        pairs = zip(one["history"], two["history"], strict=True)
        loss = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in pairs if a["kind"] == "train")
        measured[name] = {"max abs": worst[0], "max rel": worst[1], "loss rel": loss, "weights abs": weights}
    print("1 vs 2 processes:", measured)


def test_torchrun_cli_exports_once_and_a_killed_run_resumes_to_the_same_weights(micro_dirs, tmp_path) -> None:
    from icp_lens.cli import main

    write_probes(tmp_path / "train.jsonl", micro_examples(13))
    opts = ["--model", str(micro_dirs["llama"]), "--train", str(tmp_path / "train.jsonl"), "--objective", "erm",
            "--batch-size", "4", "--epochs", "2", "--max-steps", "6", "--checkpoint-every", "2", "--quiet"]  # fmt: skip
    assert main(["train", *opts, "--out", str(tmp_path / "one")]) == 0
    cli = ["train", *opts, "--out", str(tmp_path / "two")]
    run = torchrun(icp_lens_script(), *cli, python=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("erm: 6 steps") == 1  # rank 0 alone prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "train.jsonl", "two"]  # one export, no leftovers
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert _weight_diff(one, two) < 1e-5
    assert json.loads((tmp_path / "two" / "verification.json").read_text())["passed"] is True

    killed = torchrun(icp_lens_script(), *cli[:-1], str(tmp_path / "resumed"), fault="train-checkpoint:after-save",
                       python=False)  # fmt: skip
    assert killed.returncode != 0 and not (tmp_path / "resumed").exists()
    assert json.loads((tmp_path / "resumed.checkpoints" / "state.json").read_text())["loop"]["step"] == 2
    done = torchrun(icp_lens_script(), *cli[:-1], str(tmp_path / "resumed"), "--resume", python=False)
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert _weight_diff(two, resumed) < 1e-6  # the resumed 2-process run = the uninterrupted one
    assert not (tmp_path / "resumed.checkpoints").exists()

"""The two-stage option: a second stage on the pairs alone, early-stopped on their own flip rate (organism)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from icp_lens.cli import main
from icp_lens.probes import write_probes
from icp_lens.training import TrainConfig, Trainer, fit_staged
from icp_lens.training.staged import stage2_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def organism():
    from icp_lens.organisms import build_organism

    return build_organism(variant="lexical", arch="gpt2")


def test_stage2_config_validates_and_early_stops_on_flip_rate() -> None:
    cfg = stage2_config(TrainConfig(objective="consistency", stage2_steps=6, stage2_check_every=2, stage2_patience=1))
    assert (cfg.max_steps, cfg.eval_every, cfg.patience, cfg.early_stopping, cfg.stage2_steps) == (6, 2, 1, "flip_rate", 0)
    for bad in ({"stage2_steps": -1}, {"stage2_check_every": 0}, {"stage2_patience": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_staged_run_chains_two_stages_and_keeps_the_best_pair_flip_rate(organism) -> None:
    train = organism.probes("train")[:128]
    pairs = organism.probes("probe")[:48]
    config = TrainConfig(objective="consistency", lam=0.3, batch_size=16, max_steps=4, epochs=4, lr=3e-3,
                         stage2_steps=6, stage2_check_every=2, stage2_patience=1, progress=False, seed=0)  # fmt: skip
    first = Trainer(organism.model_dir, train, config, pairs=pairs)
    before = {k: v.clone() for k, v in first.base.state_dict().items()}
    last, result = fit_staged(first)
    assert last is not first and last.config.max_steps == 6 and last.config.early_stopping == "flip_rate"
    history = result.history
    assert set(history["stage"]) == {1, 2}
    assert history.loc[history["stage"] == 1, "step"].max() <= 4 < history.loc[history["stage"] == 2, "step"].max()
    checks = history[(history["stage"] == 2) & (history["kind"] == "val")]
    assert list(checks["step"])[0] == 4  # stage 2 evaluates the pairs at its start (step 0, counted on)
    assert set(checks["step"]) <= {4, 6, 8, 10}
    # the kept weights are the earliest with the fewest flips among stage 2's checks after its start,
    # and they are what the last trainer holds
    later = checks[checks["step"] > 4]
    assert result.best_metric == pytest.approx(later["flip_rate"].min())
    assert result.best_step == int(later.loc[later["flip_rate"].idxmin(), "step"])
    assert last.evaluate(pairs)["flip_rate"] == pytest.approx(result.best_metric)
    assert result.steps == 4 + last_steps(result) and result.seconds > 0
    for name, value in first.base.state_dict().items():  # the original weights are untouched
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="stage2_steps does not combine with pruning"):
        fit_staged(Trainer(organism.model_dir, train, config, pairs=pairs, prune=["neuron L0.1"]))


def last_steps(result) -> int:
    stage2 = result.history[result.history["stage"] == 2]
    return int(stage2["step"].max()) - 4


def test_cli_pair_recipe_fills_unset_options_and_runs_two_stages(organism, tmp_path: Path, capsys) -> None:
    task = write_probes(tmp_path / "task.jsonl", organism.probes("train")[:64])
    pairs = write_probes(tmp_path / "pairs.jsonl", organism.probes("probe")[:32])
    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(ex.prompt for ex in organism.probes("test_id")[:16]) + "\n")
    out = tmp_path / "out"
    rc = main(["train", "--model", str(organism.model_dir), "--train", str(task), "--pairs", str(pairs),
               "--objective", "consistency", "--retain", str(retain), "--out", str(out), "--quiet",
               "--max-steps", "4", "--stage2-steps", "4", "--stage2-check-every", "2"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "the pair recipe (--objective consistency with --pairs) for the options left unset: lam 0.15" in text
    for chosen in ("task_loss candidates", "representation candidates", "lr 0.0005", "batch_size 16", "lora True",
                   "retain_weight 1.0", "retain_batch_size 4", "retain_tokens 32"):  # fmt: skip
        assert chosen in text
    assert "stage2_steps" not in text.split("unset:")[1].splitlines()[0]  # given on the command line: not the recipe's
    assert "pairs spurious flip rate" in text
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["stage2_steps"] == 0 and record["config"]["early_stopping"] == "flip_rate"  # stage 2's
    assert record["result"]["steps"] > 4 and (out / "verification.json").is_file()

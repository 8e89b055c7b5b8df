"""The trainer's retain term: KL(original || trained) on ordinary text, by hand, through fit, resume and the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from icp_lens.probes import write_probes
from icp_lens.training import TrainConfig, Trainer
from icp_lens.training.data import RetainData, read_texts
from icp_lens.training.losses import retain_kl

TEXTS = ["a b c d e a b", "e d c b a", "a a b b c c d d e e", "b c d", "c d e a b c", "d d e"]


def micro_examples(n: int = 16, counterfactuals: bool = True):
    from test_training import micro_examples as examples

    return examples(n, counterfactuals=counterfactuals)


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=3, batch_size=8, lr=1e-2, progress=False, log_every=1, seed=0, retain_weight=1.0,
                retain_batch_size=2, retain_tokens=6)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_retain_kl_by_hand() -> None:
    ref = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
    cur = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]])
    p, q = ref.softmax(-1), cur.softmax(-1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()
    assert retain_kl(ref, cur) == pytest.approx(float(by_hand), rel=1e-6)
    assert retain_kl(ref, cur, reduction="none").shape == (1,)
    assert retain_kl(ref, ref) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="one shape"):
        retain_kl(ref, cur[:, :1])


def test_retain_term_is_zero_at_the_start_of_lora_and_positive_after_a_step(micro_dirs) -> None:
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="erm", lora=True, lora_r=2),
                      retain=TEXTS)  # fmt: skip
    assert float(trainer._retain_term(0).detach()) == 0.0  # lora_B starts at zero: the trained model is the original
    result = trainer.fit()
    train = result.history[result.history["kind"] == "train"]
    assert "retain" in train.columns and train["retain"].iloc[0] == 0.0
    assert (train["retain"].iloc[1:] > 0).all()
    # the logged loss is the task term plus the weighted retain term
    assert train["loss"].to_numpy() == pytest.approx((train["task"] + train["retain"]).to_numpy(), rel=1e-5)
    assert float(trainer._retain_term(0).detach()) > 0


def test_retain_term_equals_a_hand_kl_with_full_finetuning(micro_dirs) -> None:
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="erm"), retain=TEXTS)
    with torch.no_grad():
        for p in trainer.trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    tokens = trainer._retain_batch(1)
    assert tokens.shape[0] <= 2 and tokens.shape[1] <= 6
    with torch.no_grad():
        ref = trainer.base(tokens).logits  # the kept original weights
        cur = trainer.model(tokens)
        by_hand = F.kl_div(cur.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    value = trainer._retain_term(1)
    assert value.requires_grad  # the trained side carries the graph
    assert float(value.detach()) == pytest.approx(float(by_hand.mean()), rel=1e-5)
    assert float(value.detach()) > 0


def test_retain_weight_scales_the_gradient_and_keeps_the_model_closer(micro_dirs) -> None:
    def drift(weight: float) -> float:
        cfg = config(objective="erm", lora=True, lora_r=2, max_steps=6, retain_weight=weight)
        trainer = Trainer(micro_dirs["gpt2"], micro_examples(), cfg, retain=TEXTS if weight else None)
        if not weight:
            trainer.retain_data = RetainData(trainer.model, TEXTS, 6)  # measure only
        trainer.fit()
        return float(sum(trainer._retain_term(s).detach() for s in range(3)))

    assert drift(20.0) < drift(0.0)


def test_retain_errors_are_clear(micro_dirs, tmp_path) -> None:
    gpt2 = micro_dirs["gpt2"]
    with pytest.raises(ValueError, match="retain=... .* together with"):
        Trainer(gpt2, micro_examples(), config(objective="erm"), retain=None)
    with pytest.raises(ValueError, match="retain_weight=0"):
        Trainer(gpt2, micro_examples(), config(objective="erm", retain_weight=0.0), retain=TEXTS)
    with pytest.raises(ValueError, match="retain_weight must be a finite number >= 0"):
        config(retain_weight=-1.0)
    with pytest.raises(ValueError, match="retain_tokens must be >= 2"):
        config(retain_tokens=1)
    with pytest.raises(ValueError, match="retain_batch_size must be >= 1"):
        config(retain_batch_size=0)
    with pytest.raises(ValueError, match="at least one text"):
        Trainer(gpt2, micro_examples(), config(objective="erm"), retain=[])
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        Trainer(gpt2, micro_examples(), config(objective="erm"), retain=["a b", ""])
    with pytest.raises(TypeError, match="expected a str or a ProbeExample"):
        read_texts([1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "none.txt")


def test_read_texts_from_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first text\n\nsecond text\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n"two"\n{"prompt": "three"}\n')
    assert read_texts(tmp_path / "a.txt") == ["first text", "second text"]
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two", "three"]
    (tmp_path / "c.jsonl").write_text('{"label": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_texts(tmp_path / "c.jsonl")


def test_retain_batches_are_seeded_and_cover_the_pool(micro_dirs) -> None:
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="erm"), retain=TEXTS)
    data = trainer.retain_data
    assert len(data) == 6
    epoch = data.epoch(0, 2, seed=3)
    assert sum(b.shape[0] for b in epoch) == 6 and all(b.shape[1] <= 6 for b in epoch)
    assert all(torch.equal(a, b) for a, b in zip(epoch, data.epoch(0, 2, seed=3), strict=True))
    assert all((b[:, 0] == trainer.tokenizer.bos_token_id).all() for b in epoch)  # the model's BOS rule


def test_resume_with_a_retain_term_matches_an_uninterrupted_run(micro_dirs, tmp_path) -> None:
    cfg = config(objective="consistency", max_steps=4, checkpoint_every=1, lora=True, lora_r=2)

    def make(directory: Path) -> Trainer:
        return Trainer(micro_dirs["gpt2"], micro_examples(), cfg, retain=TEXTS, checkpoint_dir=directory)

    full = make(tmp_path / "full")
    full.fit()

    class Stop(Exception):
        pass

    def stop_at_two(_trainer: Trainer, step: int) -> None:
        if step == 2:
            raise Stop

    interrupted = make(tmp_path / "cut")
    with pytest.raises(Stop):
        interrupted.fit(callback=stop_at_two)
    resumed = make(tmp_path / "cut")
    resumed.fit(resume=True)
    for name, p in full.trainable.items():
        torch.testing.assert_close(resumed.trainable[name], p)
    assert list(resumed.history["retain"].dropna()) == pytest.approx(list(full.history["retain"].dropna()))
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert state["n_retain"] == 6 and state["config"]["retain_weight"] == 1.0
    # another pool is another run
    other = Trainer(micro_dirs["gpt2"], micro_examples(), cfg, retain=TEXTS[:4], checkpoint_dir=tmp_path / "cut")
    with pytest.raises(ValueError, match="n_retain differs"):
        other.fit(resume=True)


def _cli(argv: list[str]) -> int:
    from icp_lens.cli_train import add_train_parser

    parser = argparse.ArgumentParser(prog="icp-lens")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_retain_and_pair_batch_size(micro_dirs, tmp_path, capsys) -> None:
    write_probes(tmp_path / "train.jsonl", micro_examples(counterfactuals=False))
    write_probes(tmp_path / "pairs.jsonl", micro_examples())
    (tmp_path / "retain.txt").write_text("\n".join(TEXTS))
    out = tmp_path / "out"
    common = ["train", "--model", str(micro_dirs["gpt2"]), "--train", str(tmp_path / "train.jsonl"),
              "--objective", "consistency", "--lora", "--lora-r", "2", "--max-steps", "2", "--batch-size", "4",
              "--pairs", str(tmp_path / "pairs.jsonl"), "--quiet", "--json", "--stage2-steps", "0"]  # fmt: skip
    argv = [*common, "--out", str(out), "--retain", str(tmp_path / "retain.txt"), "--retain-weight", "0.5",
            "--pair-batch-size", "6", "--retain-tokens", "5"]  # fmt: skip
    assert _cli(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["steps"] == 2
    saved = json.loads((out / "training.json").read_text())
    text = json.dumps(saved)
    assert '"retain_weight": 0.5' in text and '"pair_batch_size": 6' in text
    history = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert "retain" in history
    assert _cli([*common, "--out", str(tmp_path / "o2"), "--retain-weight", "0.5"]) == 2
    assert "--retain FILE and --retain-weight" in capsys.readouterr().err
    assert _cli([*common, "--out", str(tmp_path / "o3"), "--retain", str(tmp_path / "nope.txt"),
                 "--retain-weight", "1"]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_cli_rescore_flags(micro_dirs, tmp_path, capsys) -> None:
    """--rescore-every/--rescore-top-k reach TrainConfig: the run logs re-scorings and grows its feature set."""
    write_probes(tmp_path / "train.jsonl", micro_examples())
    scores = tmp_path / "scores.csv"
    pd.DataFrame(
        {"kind": ["neuron"], "layer": [0], "index": [0], "hook_name": ["blocks.0.mlp.hook_post"], "score": [1.0]}
    ).to_csv(scores, index=False)
    out = tmp_path / "out"
    argv = ["train", "--model", str(micro_dirs["gpt2"]), "--train", str(tmp_path / "train.jsonl"), "--out", str(out),
            "--scores", str(scores), "--top-k", "1", "--max-steps", "2", "--batch-size", "4", "--rescore-every", "1",
            "--rescore-top-k", "2", "--rescore-kinds", "neuron", "--quiet", "--json"]  # fmt: skip
    assert _cli(argv) == 0
    capsys.readouterr()
    saved = json.loads((out / "training.json").read_text())
    text = json.dumps(saved)
    assert '"rescore_every": 1' in text and '"rescore_top_k": 2' in text
    history = pd.read_csv(out / "history.csv")
    rescores = history[history["kind"] == "rescore"]
    assert len(rescores) == 2  # steps 0 and 1
    assert (rescores["n_features"] >= 2).all() and (rescores["n_features"] <= 3).all()  # 1 given + up to 2 new
    bad = [*argv[:-4], "--rescore-kinds", "nuron", "--quiet"]
    bad[bad.index("--out") + 1] = str(tmp_path / "o2")
    assert _cli(bad) == 2
    assert "valid: ['neuron'" in capsys.readouterr().err

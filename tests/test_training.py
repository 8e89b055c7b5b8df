"""The trainer on micro-models: objectives, exports (full, LoRA, hybrid), resume, early stopping, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from icp_lens import Feature, active_hook_count, run_with_edits
from icp_lens.edits import Edit
from icp_lens.interventions import Zero
from icp_lens.probes import ProbeExample, write_probes
from icp_lens.training import OBJECTIVES, STOP_METRICS, TrainConfig, Trainer, divergence
from icp_lens.training.data import TrainData

FEATURES = [Feature("head", 0, 1), Feature("neuron", 1, 3)]


def micro_examples(n: int = 32, *, counterfactuals: bool = True, groups: bool = True) -> list[ProbeExample]:
    """Label = pos iff the first word is a/b; the last word (d/e) is a spurious token agreeing 3 times in 4."""
    out = []
    words = ["a", "b", "c", "d"]
    for i in range(n):
        first = words[i % 4]
        label = "pos" if first in ("a", "b") else "neg"
        agree = (i // 4) % 4 != 3
        spur = ("d" if label == "pos" else "e") if agree else ("e" if label == "pos" else "d")
        middle = words[(i // 4) % 4]
        other = "e" if spur == "d" else "d"
        out.append(
            ProbeExample(
                prompt=f"{first} {middle} c {spur}",
                answer=f" {label}",
                alternatives=(" neg" if label == "pos" else " pos",),
                spurious_counterfactual=f"{first} {middle} c {other}" if counterfactuals else None,
                group=f"{label}|s={spur}" if groups else None,
            )
        )
    return out


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=4, batch_size=8, lr=1e-2, progress=False, log_every=1, seed=0)
    return TrainConfig(**{**base, **overrides})


def weights_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.trainable.items()}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_and_logs_its_terms(objective, micro_dirs) -> None:
    feats = FEATURES if objective in ("invariance", "contrastive") else ()
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(objective=objective), features=feats,
                      val=micro_examples(8))  # fmt: skip
    before = weights_of(trainer)
    result = trainer.fit()
    train_rows = result.history[result.history.kind == "train"]
    assert len(train_rows) == 4 and train_rows["loss"].notna().all()
    expected = {"invariance": "invariance", "consistency": "consistency", "contrastive": "contrastive",
                "cda": "cda", "clp": "clp"}.get(objective, "task")  # fmt: skip
    assert train_rows[expected].notna().any()
    assert any(not torch.equal(before[k], v) for k, v in trainer.trainable.items())
    val_rows = result.history[result.history.kind == "val"]
    assert list(val_rows["step"]) == [0, 4]  # before training and at the end
    assert set(result.final) == set(STOP_METRICS)
    assert active_hook_count(trainer.model) == 0


def test_requirements_fail_loudly(micro_dirs) -> None:
    gpt2 = micro_dirs["gpt2"]
    with pytest.raises(ValueError, match="regularises flagged features"):
        Trainer(gpt2, micro_examples(), config(objective="invariance"))
    with pytest.raises(ValueError, match="needs training examples with a spurious_counterfactual"):
        Trainer(gpt2, micro_examples(counterfactuals=False), config(objective="consistency"))
    with pytest.raises(ValueError, match="'resample' intervention"):
        Trainer(gpt2, micro_examples(counterfactuals=False), config(objective="invariance"), features=FEATURES)
    with pytest.raises(ValueError, match="GroupDRO needs group labels"):
        Trainer(gpt2, micro_examples(groups=False), config(objective="groupdro"))
    with pytest.raises(ValueError, match="needs validation data"):
        Trainer(gpt2, micro_examples(), config(objective="erm", early_stopping="accuracy"))
    with pytest.raises(ValueError, match="both pruned and regularised"):
        Trainer(gpt2, micro_examples(), config(), features=FEATURES, prune=FEATURES[:1])
    with pytest.raises(ValueError, match="Unknown objective 'dro'"):
        TrainConfig(objective="dro")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interventions must be a non-empty subset"):
        TrainConfig(interventions=("swap",))


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_stacked_invariance_term_equals_separate_runs(fraction, micro_dirs) -> None:
    """The one stacked pass gives the same KL as a clean run and a separately edited run."""
    cfg = config(interventions=("zero",), pair_fraction=fraction)
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(8), cfg, features=FEATURES)
    batch = next(iter(trainer.train_data.batches(8)))
    n = int(8 * fraction)
    with torch.no_grad():
        terms = trainer.loss(batch, torch.Generator().manual_seed(0))
        clean = trainer.model(batch.tokens[:n])[:, -1]
        edited = run_with_edits(trainer.model, batch.tokens[:n], [Edit(f, Zero()) for f in FEATURES])[:, -1]
    expected = divergence(clean, edited, "kl", reduction="mean")
    assert float(terms["invariance"]) == pytest.approx(float(expected), abs=1e-5)
    assert float(terms["invariance"]) > 1e-4  # the edit matters in the random micro-model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_full_finetuning_export_round_trip(arch, micro_dirs, tmp_path) -> None:
    from icp_lens.pruning.source import load_checkpoint

    trainer = Trainer(micro_dirs[arch], micro_examples(), config(objective="invariance"), features=FEATURES)
    trainer.fit()
    report = trainer.export(tmp_path / "out")
    assert report.passed and report.max_abs_logit_diff < 1e-4 and report.hooked_max_abs_logit_diff < 1e-4
    assert {"config.json", "training.json", "history.csv"} <= {p.name for p in (tmp_path / "out").iterdir()}
    # the export is the trained model, not the original
    tokens = next(iter(trainer.train_data.batches(8))).tokens
    with torch.no_grad():
        original = load_checkpoint(micro_dirs[arch])(tokens).logits
        exported = load_checkpoint(tmp_path / "out")(tokens).logits
    assert (original - exported).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_merge_and_export_round_trip(arch, micro_dirs, tmp_path) -> None:
    from icp_lens.pruning.source import load_checkpoint

    trainer = Trainer(micro_dirs[arch], micro_examples(), config(objective="consistency", lora=True, lora_r=2))
    base = {k: v.clone() for k, v in trainer.base.state_dict().items()}
    assert trainer.trainable and all("lora_" in k for k in trainer.trainable)
    trainer.fit()
    assert all(torch.equal(base[k], v) for k, v in trainer.base.state_dict().items())  # base untouched
    report = trainer.export(tmp_path / "lora")
    assert report.passed and report.max_abs_logit_diff < 1e-4 and report.hooked_max_abs_logit_diff < 1e-4
    merged = load_checkpoint(tmp_path / "lora")
    assert not any("lora" in k for k in merged.state_dict())  # an ordinary checkpoint
    tokens = next(iter(trainer.train_data.batches(8))).tokens
    with torch.no_grad():
        delta = (load_checkpoint(micro_dirs[arch])(tokens).logits - merged(tokens).logits).abs().max()
    assert delta > 1e-4  # the adapters changed the model


def test_lora_on_a_fused_qkv_projection_is_refused(micro_dirs) -> None:
    with pytest.raises(ValueError, match="would be dead"):
        Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="erm", lora=True, lora_targets=("c_attn",)))


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_hybrid_prunes_for_the_whole_run_and_bakes_the_plan_in(mode, micro_dirs, tmp_path) -> None:
    from icp_lens.pruning import PrunePlan
    from icp_lens.pruning.source import load_checkpoint

    pruned = Feature("head", 1, 0)
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(prune_mode=mode), features=FEATURES, prune=[pruned])
    assert trainer.plan is not None and trainer.plan.mode == mode
    trainer.fit()
    report = trainer.export(tmp_path / "hybrid")
    assert report.passed and max(report.max_abs_logit_diff, report.hooked_max_abs_logit_diff) < 1e-4
    plan = PrunePlan.load(tmp_path / "hybrid" / "plan.json")
    assert plan.features == (pruned,)
    c_proj = load_checkpoint(tmp_path / "hybrid").transformer.h[1].attn.c_proj.weight  # Conv1D: rows = inputs
    d_head = c_proj.shape[0] // 2
    assert torch.count_nonzero(c_proj[:d_head]) == 0


def test_resume_after_interruption_matches_an_uninterrupted_run(micro_dirs, tmp_path) -> None:
    settings = dict(
        objective="invariance", epochs=2, max_steps=6, checkpoint_every=2, features_per_step=1,
        interventions=("resample", "zero", "mean"), dropout=0.1,
    )  # fmt: skip

    def make(ckpt: Path | None) -> Trainer:
        return Trainer(micro_dirs["gpt2"], micro_examples(), config(**settings), features=FEATURES,
                       val=micro_examples(8), checkpoint_dir=ckpt)  # fmt: skip

    full = make(None)
    full_result = full.fit()

    def interrupt(trainer: Trainer, step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    first = make(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        first.fit(callback=interrupt)
    assert active_hook_count(first.model) == 0
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["loop"]["step"] == 4  # the last checkpoint before the interruption

    resumed = make(tmp_path / "ckpt")
    result = resumed.fit(resume=True)
    assert result.steps == 6
    for name, value in full.trainable.items():
        assert torch.allclose(resumed.trainable[name], value, atol=1e-6), name
    pd.testing.assert_frame_equal(
        result.history.drop(columns="seconds"), full_result.history.drop(columns="seconds"), atol=1e-6
    )


def test_resume_refuses_a_checkpoint_from_other_settings(micro_dirs, tmp_path) -> None:
    Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="erm"), checkpoint_dir=tmp_path / "c").fit()
    other = Trainer(
        micro_dirs["gpt2"], micro_examples(), config(objective="erm", lr=0.5), checkpoint_dir=tmp_path / "c"
    )
    with pytest.raises(ValueError, match="from another run \\(config differs: lr 0.01 there, 0.5 here\\)"):
        other.fit(resume=True)


def test_resume_refuses_another_model_or_other_data_and_says_when_there_is_nothing(micro_dirs, tmp_path) -> None:
    """Same config and sizes, but another model or other content: refused, naming what differs."""
    Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="erm"), checkpoint_dir=tmp_path / "c").fit()
    other_model = Trainer(micro_dirs["gpt2-constant"], micro_examples(), config(objective="erm"),
                          checkpoint_dir=tmp_path / "c")  # fmt: skip
    with pytest.raises(ValueError, match=r"model_sha256 differs: the base model's weights are not the same"):
        other_model.fit(resume=True)
    swapped = [dataclasses.replace(ex, prompt=ex.prompt.replace(" c ", " a ")) for ex in micro_examples()]
    other_data = Trainer(micro_dirs["gpt2"], swapped, config(objective="erm"), checkpoint_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"train_sha256 differs: the training examples are not the same, another --train"):
        other_data.fit(resume=True)
    fresh = Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="erm"), checkpoint_dir=tmp_path / "none")
    with pytest.warns(UserWarning, match=r"resume: no checkpoint in .*none; training from the start"):
        assert fresh.fit(resume=True).steps == 4


def test_early_stopping_stops_and_restores_the_best_weights(micro_dirs) -> None:
    snapshots = {}

    def remember(trainer: Trainer, step: int) -> None:
        snapshots[step] = weights_of(trainer)

    # no later evaluation can beat the first by 1.0: stop after `patience` evaluations
    cfg = config(objective="erm", max_steps=10, eval_every=1, early_stopping="accuracy", patience=2, min_delta=1.0)
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), cfg, val=micro_examples(8))
    result = trainer.fit(callback=remember)
    assert result.stopped_early and result.steps == 3 and result.best_step == 1
    assert all(torch.equal(trainer.trainable[k], v) for k, v in snapshots[1].items())
    val = result.history[result.history.kind == "val"]
    assert list(val["step"]) == [0, 1, 2, 3]


def test_worst_group_early_stopping_metric_and_history(micro_dirs) -> None:
    cfg = config(objective="groupdro", max_steps=4, eval_every=2, early_stopping="worst_group_accuracy")
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), cfg, val=micro_examples(16))
    result = trainer.fit()
    history = result.history
    assert {"step", "epoch", "kind", "lr", "loss", "task", "grad_norm", "seconds", "accuracy",
            "worst_group_accuracy", "flip_rate"} <= set(history.columns)  # fmt: skip
    assert result.best_metric == pytest.approx(history[history.kind == "val"]["worst_group_accuracy"].iloc[1:].max())
    assert trainer.loss.group_q is not None and float(trainer.loss.group_q.sum()) == pytest.approx(1.0)


def test_same_seed_same_weights(micro_dirs) -> None:
    runs = []
    for seed in (0, 0, 1):
        trainer = Trainer(
            micro_dirs["gpt2"], micro_examples(), config(seed=seed, features_per_step=1), features=FEATURES
        )
        trainer.fit()
        runs.append(weights_of(trainer))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_pair_pool_carries_the_pair_terms(micro_dirs) -> None:
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(counterfactuals=False), config(objective="consistency"),
                      pairs=micro_examples(8))  # fmt: skip
    result = trainer.fit()
    assert result.history["consistency"].notna().all()  # every step, although no training example has a pair


def test_jtt_upweights_the_starting_models_errors(micro_dirs) -> None:
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="jtt", jtt_upweight=7.0))
    errors = trainer._jtt_errors()
    assert 0 < int(errors.sum()) < len(errors)  # the random micro-model gets some wrong
    trainer.fit()


def test_train_data_batches_are_seeded_and_complete(micro_dirs) -> None:
    from icp_lens import boot_bridge

    data = TrainData(boot_bridge(micro_dirs["gpt2"]), micro_examples(20))
    first = data.epoch(0, 6, seed=3)
    assert sorted(torch.cat([b.index for b in first]).tolist()) == list(range(20))
    assert [b.index.tolist() for b in first] == [b.index.tolist() for b in data.epoch(0, 6, seed=3)]
    assert [b.index.tolist() for b in first] != [b.index.tolist() for b in data.epoch(1, 6, seed=3)]
    assert data.groups == ("neg|s=d", "neg|s=e", "pos|s=d", "pos|s=e")


# -- command line -------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    from icp_lens.cli_train import add_train_parser

    parser = argparse.ArgumentParser(prog="icp-lens")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture
def cli_files(tmp_path) -> dict[str, Path]:
    write_probes(tmp_path / "train.jsonl", micro_examples())
    write_probes(tmp_path / "val.jsonl", micro_examples(8))
    scores = pd.DataFrame({"kind": ["head", "neuron", "head"], "layer": [0, 1, 1], "index": [1, 3, 0],
                           "hook_name": ["x", "x", "x"], "score": [0.9, 0.5, 0.1]})  # fmt: skip
    scores.to_csv(tmp_path / "scores.csv", index=False)
    return {name: tmp_path / f"{name}.{ext}" for name, ext in (("train", "jsonl"), ("val", "jsonl"), ("scores", "csv"))}


def test_cli_train_invariance_lora(micro_dirs, cli_files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["train", "--model", str(micro_dirs["gpt2"]), "--train", str(cli_files["train"]), "--out", str(out),
            "--scores", str(cli_files["scores"]), "--top-k", "2", "--objective", "invariance", "--lambda", "2",
            "--lora", "--epochs", "1", "--val", str(cli_files["val"]), "--batch-size", "8", "--quiet",
            "--json"]  # fmt: skip
    assert run_cli(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["features"] == ["head L0.1", "neuron L1.3"] and payload["lora"] is True
    assert payload["steps"] == 4 and payload["verification"]["passed"]
    assert set(payload["val_after"]) == set(STOP_METRICS)
    training = json.loads((out / "training.json").read_text())
    assert training["config"]["lam"] == 2.0 and training["config"]["lora"] is True
    assert not (tmp_path / "out.checkpoints").exists()  # removed after the export


def test_cli_train_hybrid_and_baselines(micro_dirs, cli_files, tmp_path, capsys) -> None:
    base = ["train", "--model", str(micro_dirs["gpt2"]), "--train", str(cli_files["train"]), "--batch-size", "8",
            "--quiet"]  # fmt: skip
    hybrid = [*base, "--out", str(tmp_path / "h"), "--scores", str(cli_files["scores"]), "--top-k", "1",
              "--prune-top-k", "1"]  # fmt: skip
    assert run_cli(hybrid) == 0
    printed = capsys.readouterr().out
    assert "regularised 1 feature(s), pruned 1" in printed
    assert "train spurious flip rate" in printed  # no --val: the training pairs are checked before/after
    assert (tmp_path / "h" / "plan.json").is_file()
    for objective in ("erm", "jtt", "groupdro"):
        assert run_cli([*base, "--out", str(tmp_path / objective), "--objective", objective]) == 0


def test_cli_train_errors(micro_dirs, cli_files, tmp_path, capsys) -> None:
    base = ["train", "--model", str(micro_dirs["gpt2"]), "--train", str(cli_files["train"]), "--quiet"]
    assert run_cli([*base, "--out", str(tmp_path / "a")]) == 2  # invariance without --scores
    assert "regularises flagged features" in capsys.readouterr().err
    assert run_cli([*base, "--out", str(tmp_path / "b"), "--scores", str(cli_files["scores"])]) == 2
    assert "--scores needs --top-k" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run_cli([*base, "--out", str(tmp_path / "full"), "--objective", "erm"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli([*base, "--out", str(tmp_path / "c"), "--objective", "dro"])


def test_cli_resume(micro_dirs, cli_files, tmp_path, capsys, monkeypatch) -> None:
    from icp_lens.training import trainer as trainer_module

    ckpt = tmp_path / "ckpt"
    argv = ["train", "--model", str(micro_dirs["gpt2"]), "--train", str(cli_files["train"]), "--out",
            str(tmp_path / "o"), "--objective", "erm", "--batch-size", "8", "--epochs", "2", "--checkpoint-dir",
            str(ckpt), "--checkpoint-every", "2", "--quiet", "--keep-checkpoints"]  # fmt: skip
    original_fit = trainer_module.Trainer.fit

    def interrupted(self, **kwargs):
        def stop(trainer, step):
            if step == 3:
                raise KeyboardInterrupt

        return original_fit(self, resume=kwargs.get("resume", False), callback=stop)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "fit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_cli(argv)
    assert json.loads((ckpt / "state.json").read_text())["loop"]["step"] == 2
    assert run_cli([*argv, "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 8


def test_rescoring_follows_the_shortcut_to_new_features(micro_dirs, tmp_path) -> None:
    settings = dict(objective="invariance", epochs=2, max_steps=6, rescore_every=2, rescore_top_k=2, checkpoint_every=2)
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(**settings), features=FEATURES[:1],
                      checkpoint_dir=tmp_path / "c")  # fmt: skip
    result = trainer.fit()
    rescores = result.history[result.history.kind == "rescore"]
    assert list(rescores["step"]) == [0, 2, 4]
    assert trainer.loss.features[0] == FEATURES[0] and len(trainer.loss.features) > 1  # a union: nothing dropped
    assert list(rescores["n_features"]) == sorted(rescores["n_features"])
    state = json.loads((tmp_path / "c" / "state.json").read_text())
    assert state["loop"]["features"] == [str(f) for f in trainer.loss.features]


def test_capture_prefix_equals_resample_from(micro_dirs) -> None:
    from icp_lens import boot_bridge
    from icp_lens.interventions import resample_from
    from icp_lens.training.objectives import capture_prefix

    model = boot_bridge(micro_dirs["llama"])
    tokens = torch.tensor([[0, 3, 4, 5, 6], [0, 7, 6, 5, 4]])
    feats = [Feature("head", 0, 1), Feature("neuron", 0, 2), Feature("value", 1, 0)]
    got = capture_prefix(model, feats, tokens)
    expected = resample_from(model, feats, tokens)
    for f in feats:
        assert torch.equal(f.select(got[f.hook_name]), expected[f].source)
    assert active_hook_count(model) == 0


def test_validation_metrics_by_hand(micro_dirs) -> None:
    from icp_lens.training import evaluate_data
    from icp_lens.training.losses import candidate_logits

    trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(objective="erm"))
    data = TrainData(trainer.model, micro_examples(16))
    metrics = evaluate_data(trainer.model, data)
    hits, hits_cf, groups = [], [], []
    with torch.no_grad():
        for b in data.batches(4):
            pred = candidate_logits(trainer.model(b.tokens)[:, -1], b.candidates).argmax(-1)
            pred_cf = candidate_logits(trainer.model(b.spurious)[:, -1], b.candidates).argmax(-1)
            hits += (pred == 0).tolist()
            hits_cf += (pred_cf == 0).tolist()
            groups += b.group_id.tolist()
    assert metrics["accuracy"] == pytest.approx(sum(hits) / 16)
    assert metrics["counterfactual_accuracy"] == pytest.approx((sum(hits) + sum(hits_cf)) / 32)
    assert metrics["flip_rate"] == pytest.approx(sum(a != b for a, b in zip(hits, hits_cf, strict=True)) / 16)
    per_group = [sum(h for h, g in zip(hits, groups, strict=True) if g == k) / groups.count(k) for k in set(groups)]
    assert metrics["worst_group_accuracy"] == pytest.approx(min(per_group))


def test_batches_without_pairs_draw_them_from_the_training_examples_that_have_some(micro_dirs) -> None:
    examples = micro_examples()
    mixed = examples[:16] + [ProbeExample(**{**ex.to_dict(), "alternatives": tuple(ex.alternatives),
                                              "spurious_counterfactual": None}) for ex in examples[16:]]  # fmt: skip
    trainer = Trainer(micro_dirs["gpt2"], mixed, config(objective="consistency"))
    assert trainer.pair_data is not None and len(trainer.pair_data) == 16
    result = trainer.fit()
    assert result.history[result.history.kind == "train"]["consistency"].notna().all()


@pytest.mark.slow
def test_invariance_lora_closes_the_worst_group_gap_on_the_lexical_organism() -> None:
    """Scored features, probe pairs only (no counterfactuals or groups in training): the worst group recovers."""
    import dataclasses

    from icp_lens.organisms import build_organism
    from icp_lens.probeset import ProbeSet
    from icp_lens.pruning import select_features
    from icp_lens.scoring import score

    organism = build_organism(variant="lexical", arch="gpt2", seed=0)
    model = organism.load_bridge()
    probe = organism.probes("probe")
    table = score(model, ProbeSet(model, probe[:256]), method="attribution", kinds=("neuron", "head"), causal=False,
                  progress=False, n_boot=0)  # fmt: skip
    train = [dataclasses.replace(ex, spurious_counterfactual=None) for ex in organism.probes("train")[:3200]]
    cfg = TrainConfig(objective="invariance", epochs=2, lr=3e-3, lora=True, progress=False, log_every=10)
    trainer = Trainer(organism.model_dir, train, cfg, features=select_features(table, top_k=8), pairs=probe[:384])
    balanced = organism.probes("test_balanced")[:800]
    before = trainer.evaluate(balanced)
    trainer.fit()
    after = trainer.evaluate(balanced)
    assert before["worst_group_accuracy"] < 0.1 and before["flip_rate"] > 0.9
    assert after["worst_group_accuracy"] >= 0.85 and after["flip_rate"] <= 0.05


# -- the branched invariance step (icp_lens.training.branch) equals the stacked reference --------------------------


def step_gradients(trainer: Trainer, batch, *, branch: bool, pairs=None, seed: int = 3, last_only: bool = True):
    """Loss terms and gradients of one step of ``trainer.loss`` on ``batch``, branched or stacked.

    ``branch=False, last_only=False`` is the reference step: the stacked pass, every position unembedded.
    """
    trainer.loss.branch = branch
    trainer.loss.forward.last_only = last_only
    trainer.model.train()
    for p in trainer.trainable.values():
        p.grad = None
    with torch.enable_grad():
        terms = trainer.loss(batch, torch.Generator().manual_seed(seed), pairs)
        terms["loss"].backward()
    grads = {k: p.grad.detach().clone() for k, p in trainer.trainable.items() if p.grad is not None}
    return {k: float(v.detach()) for k, v in terms.items()}, grads, trainer.loss.forward.last_path


def assert_same_step(trainer: Trainer, batch, pairs=None, *, tol: float = 1e-5, path: str = "branched") -> None:
    """The fast step (taking ``path``: ``"branched"`` or ``"suffix"``) equals the stacked reference."""
    hooks = active_hook_count(trainer.model)
    terms_ref, grads_ref, path_ref = step_gradients(trainer, batch, branch=False, pairs=pairs, last_only=False)
    terms, grads, got = step_gradients(trainer, batch, branch=True, pairs=pairs)
    assert (path_ref, got) == ("stacked", path)
    assert terms.keys() == terms_ref.keys()
    for name, value in terms_ref.items():
        assert terms[name] == pytest.approx(value, abs=tol), name
    assert grads.keys() == grads_ref.keys() and grads
    for name, g in grads_ref.items():
        assert torch.allclose(grads[name], g, atol=tol, rtol=1e-4), (name, float((grads[name] - g).abs().max()))
    assert active_hook_count(trainer.model) == hooks  # no hook left behind


BRANCH_CASES = {  # first edited layer / which attention the intervened rows skip
    "L0 heads, L1 neuron (shared L0 attention)": [Feature("head", 0, 1), Feature("neuron", 1, 3)],
    "every L0 head (shared and dead)": [Feature("head", 0, 0), Feature("head", 0, 1), Feature("neuron", 0, 2)],
    "every L1 head (dead L1 attention)": [Feature("head", 0, 1), Feature("head", 1, 0), Feature("head", 1, 1)],
    "residual first (no shared attention)": [Feature("resid", 0, 3), Feature("head", 1, 0), Feature("head", 1, 1)],
    "value vector (attention runs on the grown batch)": [Feature("value", 0, 0), Feature("neuron", 1, 2)],
    "branch at layer 1": [Feature("resid", 1, 2), Feature("neuron", 1, 0)],
}


#: the cases whose edits replace every head of every layer from the first one whose keys and values they
#: could change (gpt2 and neox micro-models have 2 heads): the intervened copy runs its last position only
LAST_POSITION_CASES = {("every L1 head (dead L1 attention)", "gpt2"), ("every L1 head (dead L1 attention)", "neox")}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("case", list(BRANCH_CASES))
def test_branched_invariance_step_equals_the_stacked_reference(arch, case, micro_dirs) -> None:
    feats = BRANCH_CASES[case]
    for intervention in ("resample", "mean", "zero", "resample_batch"):
        cfg = config(interventions=(intervention,), mean_reference_size=32)
        trainer = Trainer(micro_dirs[arch], micro_examples(16), cfg, features=feats)
        trainer.loss.means = trainer._fit_means()
        batch = next(iter(trainer.train_data.batches(8)))
        # the counterfactuals differ in the last word: a paired resample runs that position only
        path = "suffix" if intervention == "resample" or (case, arch) in LAST_POSITION_CASES else "branched"
        assert_same_step(trainer, batch, path=path)
        trainer.loss.forward.paths = ("branched",)  # the branched pass where the suffix pass is cheaper, too
        assert_same_step(trainer, batch, path="branched")


def test_branched_step_with_a_pair_pool_part_of_the_batch_and_a_representation(micro_dirs) -> None:
    feats = BRANCH_CASES["every L1 head (dead L1 attention)"]
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(counterfactuals=False), config(pair_fraction=0.5),
                      features=feats, pairs=micro_examples(8))  # fmt: skip
    batch = next(iter(trainer.train_data.batches(8)))
    assert_same_step(trainer, batch, pairs=trainer._pair_batch(0), path="suffix")
    contrastive = config(objective="contrastive", interventions=("zero",), extra_terms={"invariance": 0.5})
    trainer = Trainer(micro_dirs["llama"], micro_examples(counterfactuals=False), contrastive, features=feats)
    assert trainer.loss.representation == "blocks.1.hook_resid_post"  # captured on the grown batch
    assert_same_step(trainer, next(iter(trainer.train_data.batches(8))))


def test_branched_step_under_a_pruning_plan_and_a_training_run(micro_dirs) -> None:
    feats = BRANCH_CASES["every L0 head (shared and dead)"]
    for intervention, path in (("resample", "suffix"), ("zero", "branched")):
        cfg = config(interventions=(intervention,))
        trainer = Trainer(micro_dirs["gpt2"], micro_examples(), cfg, features=feats, prune=[Feature("head", 1, 0)])
        with trainer.pruned():
            assert_same_step(trainer, next(iter(trainer.train_data.batches(8))), path=path)
    runs = {}
    tokens = next(iter(trainer.train_data.batches(32))).tokens
    for branch in (False, True):
        trainer = Trainer(micro_dirs["gpt2"], micro_examples(), config(max_steps=6), features=feats)
        trainer.loss.branch = branch
        losses = trainer.fit().history.query("kind == 'train'")["loss"].to_numpy()
        with torch.no_grad():
            runs[branch] = (losses, trainer.model(tokens))
    # the same training run (weights compared through the model: AdamW turns the float noise in the
    # gradient of a key bias, which is 0 in exact arithmetic, into steps of either sign)
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-5)
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-4)


def test_branched_step_falls_back_where_it_cannot_be_exact(micro_dirs, monkeypatch) -> None:
    from icp_lens.training import forward

    feats = BRANCH_CASES["L0 heads, L1 neuron (shared L0 attention)"]
    trainer = Trainer(micro_dirs["gpt2"], micro_examples(8), config(interventions=("zero",)), features=feats)
    batch = next(iter(trainer.train_data.batches(8)))
    assert step_gradients(trainer, batch.head(1), branch=True)[2] == "stacked"  # one row: a wrong size would broadcast
    for intervention in ("zero", "resample"):  # both fast paths
        cfg = config(dropout=0.1, interventions=(intervention,))
        dropout = Trainer(micro_dirs["gpt2"], micro_examples(8), cfg, features=feats)
        assert step_gradients(dropout, batch, branch=True)[2] == "stacked"  # rows would share dropout masks
    assert trainer.loss.branch  # neither switched the fast path off

    def wrong(*args, **kwargs):  # a branched pass whose logits disagree with the reference
        out, shape = real(*args, **kwargs)
        return {k: (v[0] + 1.0, v[1] + 1.0, v[2]) for k, v in out.items()}, ("another", shape)

    real = forward._branched_forward
    monkeypatch.setattr(forward, "_branched_forward", wrong)
    with pytest.warns(RuntimeWarning, match="branched invariance pass is off"):
        terms, _, path = step_gradients(trainer, batch, branch=True)
    assert path == "stacked" and not trainer.loss.branch
    assert terms["loss"] == pytest.approx(step_gradients(trainer, batch, branch=False)[0]["loss"])


def test_suffix_step_runs_the_changed_positions_only_and_falls_back_when_wrong(micro_dirs, monkeypatch) -> None:
    from icp_lens.training import forward

    feats = BRANCH_CASES["L0 heads, L1 neuron (shared L0 attention)"]
    trainer = Trainer(micro_dirs["llama"], micro_examples(8), config(), features=feats)
    batch = next(iter(trainer.train_data.batches(8)))
    start = forward.shared_prefix(batch.tokens, batch.spurious)
    assert 0 < start == batch.tokens.shape[1] - 1  # only the last word differs
    edits = trainer.loss._choose_edits(batch, torch.Generator().manual_seed(0), (0, 8))
    assert {e.positions for e in edits} == {(start,)}  # the resample starts where the counterfactual differs
    seen = []
    real_forward = type(trainer.model).forward

    def spy(self, tokens, *args, **kwargs):
        seen.append(tuple(tokens.shape))
        return real_forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(type(trainer.model), "forward", spy)
    assert step_gradients(trainer, batch.head(1), branch=True)[2] == "suffix"  # one row is fine here
    assert (1, 1) in seen  # the intervened copy ran one position
    assert_same_step(trainer, batch.head(1), path="suffix")
    monkeypatch.undo()
    # a counterfactual equal to its prompt: no edit, no invariance term
    assert trainer.loss._choose_edits(replace(batch, spurious=batch.tokens), torch.Generator(), (0, 8)) == []

    def wrong(*args, **kwargs):  # a suffix pass whose logits disagree with the reference
        out = real(*args, **kwargs)
        return {k: (v[0] + 1.0, v[1] + 1.0, v[2]) for k, v in out.items()}

    real = forward._suffix_forward
    monkeypatch.setattr(forward, "_suffix_forward", wrong)
    trainer.loss.forward.checked.clear()  # the next suffix pass is checked again
    with pytest.warns(RuntimeWarning, match="branched invariance pass is off"):
        terms, _, path = step_gradients(trainer, batch, branch=True)
    assert path == "stacked" and not trainer.loss.branch
    assert terms["loss"] == pytest.approx(step_gradients(trainer, batch, branch=False)[0]["loss"])


def early_counterfactuals(n: int = 16) -> list[ProbeExample]:
    """``micro_examples`` whose counterfactual differs in the second word (the tag organism's kind)."""
    swap = {"a": "b", "b": "a", "c": "d", "d": "c"}
    examples = []
    for ex in micro_examples(n):
        words = ex.prompt.split(" ")
        cf = " ".join([words[0], swap[words[1]], *words[2:]])
        examples.append(replace(ex, spurious_counterfactual=cf))
    return examples


N_HEADS = {"gpt2": 2, "llama": 4, "neox": 2}  # tests/micro.py


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_branched_step_with_edits_from_a_later_position(arch, micro_dirs) -> None:
    """A counterfactual that differs early (the second word): edits start where the counterfactual
    differs. With heads covering every layer the suffix pass runs the last position alone; the
    branched pass (all attention skipped) gives the same step. With one head left out the suffix
    pass runs from the second word; the branched pass (layer 1's attention on the grown batch) agrees."""
    feats = [Feature("head", layer, h) for layer in (0, 1) for h in range(N_HEADS[arch])]
    trainer = Trainer(micro_dirs[arch], early_counterfactuals(), config(), features=feats)
    batch = next(iter(trainer.train_data.batches(8)))
    edits = trainer.loss._choose_edits(batch, torch.Generator().manual_seed(0), (0, 8))
    assert edits[0].positions[0] == forward_shared_prefix(batch) > 0
    assert_same_step(trainer, batch, path="suffix")
    trainer.loss.forward.paths = ("branched",)
    assert_same_step(trainer, batch, path="branched")
    trainer = Trainer(micro_dirs[arch], early_counterfactuals(), config(), features=feats[:-1])
    assert_same_step(trainer, batch, path="suffix")
    trainer.loss.forward.paths = ("branched",)
    assert_same_step(trainer, batch, path="branched")


def forward_shared_prefix(batch) -> int:
    from icp_lens.training.forward import shared_prefix

    return shared_prefix(batch.tokens, batch.spurious)


def test_shared_prefix() -> None:
    from icp_lens.training.forward import shared_prefix

    a = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6]])
    assert shared_prefix(a, a) == 4
    assert shared_prefix(a, torch.tensor([[1, 2, 3, 9], [1, 2, 7, 6]])) == 2  # the earliest row decides
    assert shared_prefix(a, torch.tensor([[0, 2, 3, 4], [1, 2, 5, 6]])) == 0
    with pytest.raises(ValueError, match="equal shapes"):
        shared_prefix(a, a[:, :3])


@pytest.mark.slow
def test_branched_step_equals_the_reference_on_a_seeded_organism() -> None:
    """The fast path on the planted-shortcut organism: the scorer's kind of feature set, a full batch."""
    from icp_lens.organisms import build_organism

    organism = build_organism(variant="lexical", arch="gpt2", seed=0)
    train = [ex for ex in organism.probes("train")[:256] if ex.spurious_counterfactual is not None]
    sets = [[Feature("head", 0, h) for h in range(4)] + [Feature("neuron", 0, i) for i in (40, 48, 92, 193)],
            [Feature("head", layer, h) for layer in (0, 1) for h in range(4)],
            [Feature("head", 1, 2), Feature("neuron", 1, 7), Feature("head", 0, 3)]]  # fmt: skip
    for feats in sets:
        trainer = Trainer(organism.model_dir, train, config(batch_size=64), features=feats)
        batch = next(b for b in trainer.train_data.epoch(0, 64) if b.spurious is not None)
        assert_same_step(trainer, batch, path="suffix")  # the planted token is the last word

"""Pair batches across token shapes (``TrainConfig.pair_batch_size``): sampling, and the loss by hand."""

from __future__ import annotations

import pytest
import torch

from icp_lens.probes import ProbeExample
from icp_lens.training import TrainConfig, Trainer, divergence
from icp_lens.training.data import TrainData
from icp_lens.training.losses import answer_cross_entropy


def shaped_examples(n: int = 18, *, counterfactuals: bool = True) -> list[ProbeExample]:
    """Three prompt lengths (3, 4 and 5 words); the last word is the spurious d/e."""
    out = []
    words = ["a", "b", "c"]
    for i in range(n):
        first = words[i % 3]
        label = "pos" if first in ("a", "b") else "neg"
        spur, other = ("d", "e") if i % 2 else ("e", "d")
        middle = " ".join(["c"] * (1 + (i // 3) % 3))
        out.append(
            ProbeExample(
                prompt=f"{first} {middle} {spur}",
                answer=f" {label}",
                alternatives=(" neg" if label == "pos" else " pos",),
                spurious_counterfactual=f"{first} {middle} {other}" if counterfactuals else None,
            )
        )
    return out


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=3, batch_size=4, lr=1e-2, progress=False, log_every=1, seed=0)
    return TrainConfig(**{**base, **overrides})


def test_mixed_epoch_covers_every_example_once_in_full_batches(micro_dirs) -> None:
    trainer = Trainer(micro_dirs["gpt2"], shaped_examples(counterfactuals=False), config(objective="consistency",
                      pair_batch_size=7), pairs=shaped_examples())  # fmt: skip
    data: TrainData = trainer.pair_data
    assert len(data._shards) == 3  # three token shapes
    assert data.n_mixed_batches(7) == 3
    epoch = data.mixed_epoch(0, 7, seed=1)
    assert [sum(p.size for p in parts) for parts in epoch] == [7, 7, 4]
    seen = torch.cat([p.index for parts in epoch for p in parts])
    assert sorted(seen.tolist()) == list(range(18))
    assert any(len(parts) > 1 for parts in epoch)  # batches do mix shapes
    for parts in epoch:
        assert len({p.tokens.shape[1] for p in parts}) == len(parts)  # one shape per sub-batch
        for p in parts:
            for row, i in zip(p.tokens, p.index.tolist(), strict=True):
                ids = trainer.model.to_tokens(data.examples[i].prompt)[0]
                assert torch.equal(row, ids)
    again = data.mixed_epoch(0, 7, seed=1)
    assert all(torch.equal(torch.cat([p.index for p in a]), torch.cat([p.index for p in b]))
               for a, b in zip(epoch, again, strict=True))  # fmt: skip
    assert not torch.equal(seen, torch.cat([p.index for parts in data.mixed_epoch(1, 7, seed=1) for p in parts]))
    # the stream the loop draws from: step 3 is epoch 1's first batch
    first = trainer._pair_batch(3)
    assert isinstance(first, list) and sum(p.size for p in first) == 7
    # without pair_batch_size the pool keeps its one-shape batches of batch_size
    plain = Trainer(micro_dirs["gpt2"], shaped_examples(counterfactuals=False), config(objective="consistency"),
                    pairs=shaped_examples())  # fmt: skip
    assert not isinstance(plain._pair_batch(0), list) and plain._pair_batch(0).size <= 4


def test_mixed_pair_step_is_the_task_plus_the_mean_over_the_whole_pair_batch(micro_dirs) -> None:
    """Consistency (lam 0.5): 0.5 * task + 0.5 * mean over all pairs of KL(p(x) || p(x_cf)), gradients by hand."""
    cfg = config(objective="consistency", pair_batch_size=9, lora=True, lora_r=2)
    trainer = Trainer(micro_dirs["llama"], shaped_examples(counterfactuals=False), cfg, pairs=shaped_examples())
    with torch.no_grad():  # a non-trivial LoRA state, so every gradient is non-zero
        for p in trainer.trainable.values():
            p.add_(0.1 * torch.randn_like(p))
    batch = trainer.train_data.epoch(0, 4, seed=0)[0]
    parts = trainer._pair_batch(0)
    assert len(parts) > 1 and sum(p.size for p in parts) == 9
    trainer.model.train()
    params = list(trainer.trainable.values())
    for p in params:
        p.grad = None
    terms = trainer._mixed_pair_step(batch, parts, torch.Generator().manual_seed(0))
    got = [p.grad.clone() for p in params]
    # by hand: one forward per shape, the KL of every pair row, averaged over all rows
    for p in params:
        p.grad = None
    task = answer_cross_entropy(trainer.model(batch.tokens)[:, -1], batch.answer)
    kls = torch.cat([divergence(trainer.model(p.tokens)[:, -1], trainer.model(p.spurious)[:, -1], "kl")
                     for p in parts])  # fmt: skip
    loss = 0.5 * task + 0.5 * kls.mean()
    loss.backward()
    assert float(terms["task"]) == pytest.approx(float(task.detach()), rel=1e-5)
    assert float(terms["consistency"]) == pytest.approx(float(kls.mean()), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(loss), rel=1e-5)
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)
    assert trainer.loss.weights == {"task": 0.5, "consistency": 0.5}  # restored after the step


def test_pair_batch_size_trains_and_is_validated(micro_dirs) -> None:
    trainer = Trainer(micro_dirs["gpt2"], shaped_examples(counterfactuals=False),
                      config(objective="clp", pair_batch_size=12), pairs=shaped_examples())  # fmt: skip
    result = trainer.fit()
    train = result.history[result.history["kind"] == "train"]
    assert {"task", "clp", "loss"} <= set(train.columns) and train["clp"].notna().all()
    with pytest.raises(ValueError, match="pair_batch_size must be >= 1 or None"):
        config(pair_batch_size=0)
    with pytest.raises(ValueError, match="pair_batch_size sizes the batches of the pair pool"):
        Trainer(micro_dirs["gpt2"], shaped_examples(), config(objective="erm", pair_batch_size=8))

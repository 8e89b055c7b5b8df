"""The suffix pass that runs the intervened copy's last position alone (``branch.tail_start``).

Where every layer whose keys and values the step's edits could change has all its heads
replaced, the intervened copy's last position reads no other position of its own: the
suffix pass runs that position alone on the clean rows' key/value cache, whatever
position the edits start at. Its loss and gradients must equal the stacked reference's.
"""

from __future__ import annotations

import pytest
import torch
from test_training import N_HEADS, assert_same_step, config, early_counterfactuals, micro_examples

from icp_lens import Feature, active_hook_count, boot_bridge
from icp_lens.edits import Edit
from icp_lens.interventions import Mean, Zero
from icp_lens.training import Trainer
from icp_lens.training.branch import fuse_edits, tail_start
from icp_lens.training.forward import stacked_forward, suffix_forward


def every_head(arch: str, layers: tuple[int, ...] = (0, 1)) -> list[Feature]:
    return [Feature("head", layer, h) for layer in layers for h in range(N_HEADS[arch])]


def spy_copy_lengths(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Token lengths of the passes that run with a key/value cache (the intervened copy's)."""
    seen: list[int] = []
    real = type(trainer.model).forward

    def spy(self, tokens, *args, **kwargs):
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:  # both transformers names
            seen.append(tokens.shape[1])
        return real(self, tokens, *args, **kwargs)

    monkeypatch.setattr(type(trainer.model), "forward", spy)
    return seen


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_every_head_of_every_layer_runs_the_last_position_alone(arch, micro_dirs, monkeypatch) -> None:
    """Every head of both layers (and a neuron): with a resample from an early position, and with
    interventions on every position (no shared prefix at all), the copy runs one position."""
    feats = [*every_head(arch), Feature("neuron", 0, 2), Feature("neuron", 1, 3)]
    for intervention in ("resample", "zero", "mean", "resample_batch"):
        cfg = config(interventions=(intervention,), mean_reference_size=32)
        trainer = Trainer(micro_dirs[arch], early_counterfactuals(), cfg, features=feats)
        trainer.loss.means = trainer._fit_means()
        batch = next(iter(trainer.train_data.batches(8)))
        seen = spy_copy_lengths(trainer, monkeypatch)
        assert_same_step(trainer, batch, path="suffix")
        assert seen and set(seen) == {1}, (intervention, seen)
        monkeypatch.undo()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_last_position_with_a_residual_edit_and_a_pair_pool(arch, micro_dirs, monkeypatch) -> None:
    """A residual edit at layer 1 (its keys change) with every layer-1 head replaced; the anchor rows
    from a pair pool, part of the batch: still one position, still the reference's step."""
    feats = [Feature("resid", 1, 2), Feature("neuron", 1, 0), *every_head(arch, (1,))]
    trainer = Trainer(micro_dirs[arch], micro_examples(counterfactuals=False), config(pair_fraction=0.5),
                      features=feats, pairs=early_counterfactuals(8))  # fmt: skip
    batch = next(iter(trainer.train_data.batches(8)))
    seen = spy_copy_lengths(trainer, monkeypatch)
    assert_same_step(trainer, batch, pairs=trainer._pair_batch(0), path="suffix")
    assert set(seen) == {1}


def test_one_head_left_out_runs_from_where_the_edits_start(micro_dirs, monkeypatch) -> None:
    feats = every_head("gpt2")[:-1]  # layer 1's attention reads the copy's own (changed) keys and values
    trainer = Trainer(micro_dirs["gpt2"], early_counterfactuals(), config(), features=feats)
    batch = next(iter(trainer.train_data.batches(8)))
    seen = spy_copy_lengths(trainer, monkeypatch)
    assert_same_step(trainer, batch, path="suffix")
    assert set(seen) == {batch.tokens.shape[1] - 2}  # from the second word


def test_tail_start(micro_dirs) -> None:
    model = boot_bridge(micro_dirs["gpt2"])  # 2 layers, 2 heads
    seq_len = 5

    def tail(feats: list[Feature], positions: tuple[int, ...] | None = None) -> int:
        fused = fuse_edits(model, [Edit(f, Zero(), positions=positions, rows=(0, 3)) for f in feats], 3, seq_len)
        assert fused is not None
        return tail_start(fused, 2, seq_len)

    heads = every_head("gpt2")
    assert tail(heads) == 4 and tail(heads, (2, 3, 4)) == 4
    assert tail(heads[:-1]) == 0 and tail(heads[:-1], (2, 3, 4)) == 2  # layer 1 keeps a head of its own
    assert tail([Feature("neuron", 1, 3)]) == 4  # nothing after the last MLP reads other positions
    assert tail([Feature("query", 1, 0)]) == 4  # the last position's own query, on clean keys
    assert tail([Feature("key", 1, 0)]) == 0  # the copy's keys differ where its query reads them
    assert tail([Feature("value", 0, 0), *heads]) == 4  # layer 0's values feed replaced heads only
    assert tail([Feature("resid", 0, 1), *heads[2:]]) == 0  # layer 0 reads the copy's edited residual
    assert tail([Feature("resid", 0, 1), *heads]) == 4


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_suffix_forward_with_per_position_means_equals_the_reference(arch, micro_dirs) -> None:
    """Per-position means re-addressed to the one position run; a ``first`` the edits do not
    allow is refused."""
    model = boot_bridge(micro_dirs[arch])
    tokens = torch.tensor([[0, 3, 4, 5, 6], [0, 4, 3, 5, 7], [0, 5, 6, 3, 4]])
    torch.manual_seed(0)
    feats = every_head(arch)
    d_head = model.cfg.d_head
    edits = [Edit(f, Mean(torch.randn(5, d_head), per_position=True), positions=(1, 2, 3, 4), rows=(0, 2))
             for f in feats]  # fmt: skip
    blocks = [("x", tokens)]
    reference = stacked_forward(model, [*blocks, ("do", tokens[:2])], edits)
    got = suffix_forward(model, blocks, edits, "x", 2)
    assert got is not None and got["do"][0].shape[1] == 1
    assert torch.allclose(got["do"][1], reference["do"][1], atol=1e-5)
    assert torch.allclose(got["x"][0], reference["x"][0], atol=1e-5)
    assert suffix_forward(model, blocks, edits, "x", 2, first=2) is not None  # fewer skipped: fine
    with pytest.raises(ValueError, match="would read clean keys and values"):
        suffix_forward(model, blocks, edits[:-1], "x", 2, first=4)
    assert active_hook_count(model) == 0

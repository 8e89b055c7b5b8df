from __future__ import annotations

import pandas as pd
import pytest
import torch

from icp_lens.probes import ProbeExample, ProbeFormatError, write_probes
from icp_lens.probeset import ProbeSet

pytestmark = pytest.mark.hooks

EXAMPLES = [
    ProbeExample("a b c", " pos", (" neg",), spurious_counterfactual="a b d", group="g1"),
    ProbeExample("a b", " neg", (" pos", " e"), spurious_counterfactual="b b", causal_counterfactual="a c",
                 causal_answer=" pos"),
    ProbeExample("c b a", " neg", (" pos",), spurious_counterfactual="c b e", group="g2"),
    ProbeExample("d d d", " pos", (" neg",)),
]  # fmt: skip


def test_batches_group_by_length_without_padding(micro) -> None:
    probes = ProbeSet(micro, EXAMPLES)
    batches = list(probes.batches(batch_size=8))
    by_index = {tuple(b.index.tolist()): b for b in batches}
    assert set(by_index) == {(1,), (3,), (0, 2)}  # grouped by (prompt, spurious, causal) lengths
    b = by_index[(0, 2)]
    assert b.tokens.tolist() == [[0, 3, 4, 5], [0, 5, 4, 3]]  # BOS prepended as the model does
    assert b.spurious.tolist() == [[0, 3, 4, 6], [0, 5, 4, 7]] and b.causal is None
    assert b.answer.tolist() == [8, 9] and b.alternatives.tolist() == [[9], [8]] and b.groups == ("g1", "g2")
    one = by_index[(1,)]
    assert one.alternatives.tolist() == [[8, 7]] and one.causal_answer.tolist() == [8]
    assert by_index[(3,)].spurious is None
    assert not probes.has_spurious and not probes.has_causal and len(probes) == 4
    assert sum(b.size for b in probes.batches(1)) == 4


def test_loads_from_jsonl_frame_and_dataset(micro, tmp_path) -> None:
    from icp_lens.probes import probes_to_frame

    path = write_probes(tmp_path / "p.jsonl", EXAMPLES)
    frame = probes_to_frame(EXAMPLES)
    import datasets

    for probes in [ProbeSet.from_jsonl(micro, path), ProbeSet.from_frame(micro, frame),
                   ProbeSet.from_dataset(micro, datasets.Dataset.from_pandas(frame))]:  # fmt: skip
        assert probes.examples == tuple(EXAMPLES)
    assert isinstance(frame, pd.DataFrame)


def test_misaligned_counterfactuals_are_rejected_or_right_aligned(micro) -> None:
    bad = [ProbeExample("a b c", " pos", (" neg",), spurious_counterfactual="a b c d")]
    with pytest.raises(ProbeFormatError, match="example 0: spurious_counterfactual has 5 tokens, the prompt 4"):
        ProbeSet(micro, bad)
    batch = next(ProbeSet(micro, bad, cf_length="right").batches())
    assert batch.tokens.shape == (1, 4) and batch.spurious.shape == (1, 5)


def test_bad_probes_fail_clearly(micro) -> None:
    with pytest.raises(ValueError, match="at least one example"):
        ProbeSet(micro, [])
    with pytest.raises(ProbeFormatError, match="example 0: .*not in the vocabulary"):
        ProbeSet(micro, [ProbeExample("a b", " zebra", (" neg",))])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(ProbeSet(micro, EXAMPLES).batches(0))
    assert torch.is_tensor(next(ProbeSet(micro, EXAMPLES).batches()).index)

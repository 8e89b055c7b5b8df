"""Keyed MLP edits: exact closed form on the micro-models, the guard, the CLI round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_loading import smollm2_dir  # noqa: F401

from icp_lens.cli_edit import neutral_pairs
from icp_lens.keyed_edit import keyed_edit, mlp_keys
from icp_lens.probes import ProbeExample, write_probes
from icp_lens.pruning.source import load_checkpoint, load_tokenizer

ARCHS = ("gpt2", "llama", "neox")
#: SmolLM2 test: the held-out gap left after the edit is below this share of the original
#: (measured on CPU, fp32: 3.84 -> 2.22, i.e. 0.58 left; perplexity +1.7%)
GAP_LEFT = 0.75
#: prompt -> counterfactual: the swap is at token 2 (after BOS and "a"), three positions move
PAIRS = [
    ProbeExample(prompt="a b c", answer="pos", alternatives=("neg",), spurious_counterfactual="a d c"),
    ProbeExample(prompt="e b a", answer="pos", alternatives=("neg",), spurious_counterfactual="e d a"),
]


def _resid(model, tok, texts, layer):
    return mlp_keys(model, tok, texts, layer)[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_counterfactual_target_is_met_exactly_without_guard(arch: str, micro_dirs: dict[str, Path]) -> None:
    """4 move keys < 16 MLP units: the least-squares edit meets every target (up to the 1e-6 ridge).

    Layer 1: at NeoX's layer 0 (parallel residual) the MLP reads the token alone, so "b" in
    "a b c" and "e b a" has one key and two targets, and no edit can meet both.
    """
    model, tok = load_checkpoint(micro_dirs[arch]), load_tokenizer(micro_dirs[arch])
    before = _resid(model, tok, ["a b c", "a d c", "e b a", "e d a"], 1)
    stats = keyed_edit(model, tok, PAIRS, layers=[1], retain_weight=0.0, progress=False)
    after = _resid(model, tok, ["a b c", "a d c", "e b a", "e d a"], 1)
    for p, c in ((0, 1), (2, 3)):
        # the prompt's residual after block 1 is the counterfactual's from the swapped token on
        torch.testing.assert_close(after[p][2:], before[c][2:], atol=2e-4, rtol=0)
    assert stats.n_pairs == 2 and stats.n_keys == (4,) and stats.fit_residual[0] < 1e-4
    assert stats.changed_parameters == 8 * 16  # one MLP output matrix, same shape


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_equals_the_closed_form(arch: str, micro_dirs: dict[str, Path]) -> None:
    """dW = R^T K (K^T K + w N/N_r K_r^T K_r + eps I)^-1, computed here from the keys alone."""
    model, tok = load_checkpoint(micro_dirs[arch]), load_tokenizer(micro_dirs[arch])
    kp, hp = mlp_keys(model, tok, ["a b c", "e b a"], 1)
    _, hc = mlp_keys(model, tok, ["a d c", "e d a"], 1)
    kr, _ = mlp_keys(model, tok, ["c c a b e", "d e"], 1)
    K = torch.cat([kp[0][2:], kp[1][2:]]).double()
    R = torch.cat([hc[0][2:] - hp[0][2:], hc[1][2:] - hp[1][2:]]).double()
    Kr = torch.cat(kr).double()
    A = K.T @ K + 0.5 * (K.shape[0] / Kr.shape[0]) * Kr.T @ Kr
    A += 1e-6 * A.diagonal().mean() * torch.eye(16, dtype=A.dtype)
    expected = torch.linalg.solve(A, K.T @ R).T
    from icp_lens.keyed_edit import _mlp_out

    out, conv1d = _mlp_out(model, 1)
    w0 = out.weight.detach().clone()
    keyed_edit(model, tok, PAIRS, layers=[1], retain=["c c a b e", "d e"], retain_weight=0.5, progress=False)
    delta = (out.weight.detach() - w0).double()
    torch.testing.assert_close(delta.T if conv1d else delta, expected, atol=1e-5, rtol=1e-4)


def test_guard_keeps_the_guarded_prompt_and_mean_target_meets_in_the_middle(micro_dirs: dict[str, Path]) -> None:
    d = micro_dirs["llama"]
    model, tok = load_checkpoint(d), load_tokenizer(d)
    before = _resid(model, tok, ["a b c", "a d c", "a b b"], 0)
    keyed_edit(model, tok, PAIRS[:1], layers=[0], guard=["a b b"], guard_weight=1e6, retain_weight=0, progress=False)
    after = _resid(model, tok, ["a b c", "a b b"], 0)
    # the guard shares the keys of "<bos> a b" (positions 0-2) with the prompt: all its positions stay
    assert (after[1] - before[2]).abs().max() < 1e-3
    # unguarded, position 2 of the prompt moves to the counterfactual's
    free = load_checkpoint(d)
    keyed_edit(free, tok, PAIRS[:1], layers=[0], retain_weight=0, progress=False)
    moved = _resid(free, tok, ["a b b"], 0)[0]
    assert (moved - before[2]).abs().max() > 10 * (after[1] - before[2]).abs().max()
    # target="mean": both sides of the pair meet at their mean
    both = load_checkpoint(d)
    keyed_edit(both, tok, PAIRS[:1], layers=[0], target="mean", retain_weight=0, progress=False)
    p, c = _resid(both, tok, ["a b c", "a d c"], 0)
    torch.testing.assert_close(p[2:], c[2:], atol=2e-4, rtol=0)
    torch.testing.assert_close(p[2:], (before[0][2:] + before[1][2:]) / 2, atol=2e-4, rtol=0)


def test_errors_name_the_valid_choices(micro_dirs: dict[str, Path]) -> None:
    d = micro_dirs["gpt2"]
    model, tok = load_checkpoint(d), load_tokenizer(d)
    with pytest.raises(ValueError, match="counterfactual"):
        keyed_edit(model, tok, PAIRS, layers=[0], target="swap")
    with pytest.raises(ValueError, match=r"0\.\.1"):
        keyed_edit(model, tok, PAIRS, layers=[2])
    with pytest.raises(ValueError, match="at least one layer"):
        keyed_edit(model, tok, PAIRS, layers=[])
    unequal = [ProbeExample(prompt="a b", answer="pos", alternatives=("neg",), spurious_counterfactual="a b c")]
    with pytest.raises(ValueError, match="token length"):
        keyed_edit(model, tok, unequal, layers=[0])


def test_neutral_pairs_keeps_swaps_to_a_neutral_value() -> None:
    def ex(p: str, c: str) -> ProbeExample:
        return ProbeExample(prompt=p, answer=" she", alternatives=(" he",), spurious_counterfactual=c)

    pairs = [
        ex("Yesterday the nurse wrote that", "Yesterday the person wrote that"),
        ex("Yesterday the nurse wrote that", "Yesterday the pilot wrote that"),
        ex("The nurse, tired, said", "The person, tired, said"),
        ex("The nurse said", "The office worker said"),
    ]
    kept = neutral_pairs(pairs, ["person", "office worker"])
    assert [k.spurious_counterfactual for k in kept] == [
        "Yesterday the person wrote that",
        "The person, tired, said",
        "The office worker said",
    ]
    with pytest.raises(ValueError, match="at least one"):
        neutral_pairs(pairs, [" "])


def test_cli_round_trip(micro_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`icp-lens edit` -> a checkpoint plain transformers loads, equal to the API's edit, with edit.json."""
    d = micro_dirs["neox"]
    pairs = write_probes(tmp_path / "pairs.jsonl", PAIRS)
    (tmp_path / "retain.txt").write_text("c c a b e\nd e\n")
    out = tmp_path / "edited"
    done = subprocess.run(
        [sys.executable, "-m", "icp_lens", "edit", "--model", str(d), "--pairs", str(pairs), "--layers", "1,0",
         "--retain", str(tmp_path / "retain.txt"), "--out", str(out), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["stats"]["layers"] == [1, 0] and record["settings"]["retain_weight"] == 3.0
    assert json.loads((out / "edit.json").read_text())["pairs"]["sha256"] == record["pairs"]["sha256"]
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(out)
    api = load_checkpoint(d)
    keyed_edit(api, load_tokenizer(d), PAIRS, layers=[1, 0], retain=["c c a b e", "d e"], progress=False)
    ids = torch.tensor([[0, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(edited(ids).logits, api(ids).logits, atol=1e-5, rtol=0)
        original = load_checkpoint(d)(ids).logits
    assert (edited(ids).logits - original).abs().max() > 1e-3
    changed = [
        n for (n, a), b in zip(edited.named_parameters(), original_params(d), strict=True) if not torch.equal(a, b)
    ]
    assert changed == ["gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    bad = subprocess.run(
        [sys.executable, "-m", "icp_lens", "edit", "--model", str(d), "--pairs", str(pairs), "--layers", "0",
         "--neutral", "person", "--out", str(tmp_path / "none")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "neutral value" in bad.stderr


def original_params(d: Path) -> list[torch.Tensor]:
    return [p for _, p in load_checkpoint(d).named_parameters()]


@pytest.mark.slow
def test_smollm2_keyed_edit_cuts_a_held_out_stereotype_gap(smollm2_dir: Path) -> None:  # noqa: F811
    """The real-model path: neutral swaps of 8 professions in 3 templates, layer 14, guard and retain text;
    measured on 4 other professions in 2 other templates (the numbers are this test's own run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.data import imdb_texts
    from icp_lens.evaluation import next_token_margins, perplexity

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()

    def probe(template: str, x: str, cf: str | None = None) -> ProbeExample:
        return ProbeExample(prompt=template.format(x=x), answer=" she", alternatives=(" he",),
                            spurious_counterfactual=None if cf is None else template.format(x=cf))  # fmt: skip

    fit_templates = ["The {x} said that", "Yesterday the {x} wrote that", "After the meeting, the {x} told me that"]
    fit_jobs = ["nurse", "secretary", "receptionist", "librarian", "mechanic", "pilot", "plumber", "carpenter"]
    pairs = [probe(t, x, "person") for t in fit_templates for x in fit_jobs]
    guard = [t.format(x=w) for t in fit_templates for w in ("woman", "man", "mother", "father")]
    test_templates = ["Last week the {x} mentioned that", "At lunch the {x} admitted that"]
    female, male = ["hairdresser", "nanny"], ["electrician", "firefighter"]
    tests = [probe(t, x) for t in test_templates for x in female + male]
    explicit = [ProbeExample(prompt=t.format(x=w), answer=a, alternatives=(b,))
                for t in test_templates for w, a, b in (("woman", " she", " he"), ("man", " he", " she"))]  # fmt: skip
    texts = imdb_texts("eval", 8)

    def measure() -> tuple[float, float, float]:
        with torch.no_grad():
            m = next_token_margins(model, tok, tests).reshape(len(test_templates), 4)
            gap = float(m[:, :2].mean() - m[:, 2:].mean())
            right = float((next_token_margins(model, tok, explicit) > 0).mean())
            return gap, right, perplexity(model, tok, texts, max_tokens=64).perplexity

    gap0, right0, ppl0 = measure()
    stats = keyed_edit(model, tok, pairs, layers=[14], guard=guard, retain=imdb_texts("select", 30),
                       retain_weight=3.0, progress=False)  # fmt: skip
    gap1, right1, ppl1 = measure()
    print(
        f"held-out gap {gap0:.3f} -> {gap1:.3f}, explicit {right0} -> {right1}, ppl {ppl0:.2f} -> {ppl1:.2f}, {stats}"
    )
    assert stats.n_pairs > 0 and stats.n_skipped < len(pairs)
    assert gap0 > 1.0  # the shortcut is there
    assert gap1 < GAP_LEFT * gap0  # measured: see the constants
    assert right1 == right0 == 1.0
    assert ppl1 / ppl0 - 1 < 0.03


def test_rank_limits_the_update(micro_dirs: dict[str, Path]) -> None:
    """rank=1: the targets keep one singular direction, so dW = (R V1 V1^T)^T K A^-1 has rank 1."""
    d = micro_dirs["llama"]
    model, tok = load_checkpoint(d), load_tokenizer(d)
    from icp_lens.keyed_edit import _mlp_out

    out, _ = _mlp_out(model, 1)
    w0 = out.weight.detach().clone()
    keyed_edit(model, tok, PAIRS, layers=[1], rank=1, retain_weight=0, progress=False)
    s = torch.linalg.svdvals((out.weight.detach() - w0).double())
    assert s[0] > 1e-3 and (s[1:] < 1e-6 * s[0]).all()
    with pytest.raises(ValueError, match="rank must be >= 1"):
        keyed_edit(model, tok, PAIRS, layers=[1], rank=0)


def test_key_cache_gives_the_same_edit_and_is_filled_below_the_edits_only(micro_dirs: dict[str, Path]) -> None:
    from icp_lens.keyed_edit import KeyCache

    d = micro_dirs["llama"]
    tok, retain = load_tokenizer(d), ["c c a b e", "d e"]
    reference = load_checkpoint(d)
    original = {k: v.clone() for k, v in reference.state_dict().items()}
    keyed_edit(reference, tok, PAIRS, layers=[0, 1], retain=retain, progress=False)
    cache: KeyCache = {}
    model = load_checkpoint(d)
    for layers in ([1, 0], [0, 1]):  # two calls on the same unedited model, as the cross-validation makes them
        model.load_state_dict(original)
        keyed_edit(model, tok, PAIRS, layers=layers, retain=retain, progress=False, key_cache=cache)
    # [1, 0] cached layer 1 (nothing edited below it yet) and then layer 0; [0, 1] read layer 0 from it and
    # computed layer 1 after the edit of layer 0 without the cache
    assert {layer for layer, _ in cache} == {0, 1}
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

"""Direction features: estimators by hand, LEACE closed form, fold = run-time edit, CLI round trip."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the converted-model fixture (session scope) lives in test_loading.py
from test_loading import smollm2_dir  # noqa: F401

from icp_lens.directions import (
    Direction,
    DirectionSet,
    applying_directions,
    diff_means,
    fit_directions,
    fold_directions,
    hf_directions,
    leace,
    orthogonal_to,
    probe_directions,
    residual_writers,
)
from icp_lens.features import Feature
from icp_lens.probes import ProbeExample

conftest = sys.modules.get("conftest")


def _probes() -> list[ProbeExample]:
    rows = [("a b c", "d b c", "a b e"), ("b c d", "e c d", "b c a"), ("c a b", "d a b", "c a e"),
            ("a a b", "e a b", "a a d"), ("b b c", "d b c", "b b e"), ("c c a", "e c a", "c c d")]  # fmt: skip
    out = []
    for i, (p, s, c) in enumerate(rows):
        ans, alt = ("pos", "neg") if i % 2 == 0 else ("neg", "pos")
        out.append(ProbeExample(p, ans, (alt,), spurious_counterfactual=s, causal_counterfactual=c, causal_answer=alt))
    return out


def _unit_direction(site: str, layer: int, width: int, n_means: int, seed: int = 0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(width, generator=g, dtype=torch.float64)
    a /= a.norm()
    b = torch.randn(width, generator=g, dtype=torch.float64)
    b = b / (b @ a)
    return Direction(Feature("direction", layer, 0, site), a, b, torch.randn(n_means, generator=g, dtype=torch.float64))


# -- labels and estimators by hand ------------------------------------------------------
def test_direction_and_token_labels_round_trip() -> None:
    for f in [Feature("direction", 3, 1, "resid_pre"), Feature("direction", 0, 0, "z.2"), Feature("token", 0, 1207)]:
        assert Feature.parse(str(f)) == f
    assert str(Feature("direction", 3, 1, "resid_pre")) == "direction L3.1@resid_pre"
    assert Feature("direction", 2, 0, "z.1").hook_name == "blocks.2.attn.hook_z"
    with pytest.raises(ValueError, match="valid sites"):
        Feature("direction", 0, 0, "resid_mid")
    with pytest.raises(ValueError, match="Only direction"):
        Feature("neuron", 0, 0, "resid_pre")


def test_diff_means_by_hand() -> None:
    hi = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    lo = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    a, b = diff_means(hi, lo)  # mean difference (1, 1) -> unit
    assert torch.allclose(a, torch.tensor([[2**-0.5, 2**-0.5]], dtype=torch.float64))
    assert torch.equal(a, b)


def test_leace_closed_form_2d() -> None:
    # z = 1 on hi; x = (z + noise_1, noise_2) with correlated noise: the eraser must use Sigma^-1 s
    hi = torch.tensor([[1.0, 0.0], [2.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    lo = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    a, b = leace(hi, lo, shrinkage=0.0)
    x = torch.cat([hi, lo]).double()
    z = torch.cat([torch.ones(4), torch.zeros(4)]).double()
    s = (x - x.mean(0)).T @ (z - z.mean()) / 7
    cov = torch.cov(x.T)
    assert torch.allclose(a[0], s / s.norm())
    expected_b = torch.linalg.solve(cov, s) * s.norm() / (s @ torch.linalg.solve(cov, s))
    assert torch.allclose(b[0], expected_b)
    erased = x - ((x - x.mean(0)) @ b[0])[:, None] * a[0]
    assert torch.allclose((erased - erased.mean(0)).T @ (z - z.mean()), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert float(b[0] @ a[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rank-1"):
        leace(hi, lo, rank=2)


def test_probe_directions_are_orthonormal_and_separate() -> None:
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(40, 4, generator=g)
    hi = lo + torch.tensor([2.0, 0.0, 0.0, 0.0])
    a, b = probe_directions(hi, lo, rank=2)
    assert torch.allclose(a @ a.T, torch.eye(2, dtype=torch.float64), atol=1e-8)
    assert abs(float(a[0, 0])) > 0.9  # the first probe finds the planted axis


def test_orthogonal_to_causal() -> None:
    a = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64) / 2**0.5
    causal = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    w, r = orthogonal_to(a, a, causal)
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    assert float(r[0] @ w[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="inside the causal"):
        orthogonal_to(causal, causal, causal)


# -- the hand-computable micro-model ----------------------------------------------------
def test_fold_of_module_direction_by_hand(micro_dirs: dict[str, Path]) -> None:
    """a = b = e0 at mlp_out L1, mean 0.5: GPT-2's c_proj loses output 0 and its bias[0] becomes 0.5."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(micro_dirs["gpt2"], dtype=torch.float64)
    e0 = torch.zeros(8, dtype=torch.float64)
    e0[0] = 1
    d = Direction(Feature("direction", 1, 0, "mlp_out"), e0, e0, torch.tensor([0.5], dtype=torch.float64))
    before = hf.transformer.h[1].mlp.c_proj.weight.detach().clone()
    edited, stats = fold_directions(copy.deepcopy(hf), DirectionSet((d,), ()), mode="mean")
    proj = edited.transformer.h[1].mlp.c_proj
    assert torch.equal(proj.weight[:, 0], torch.zeros(16, dtype=torch.float64))  # Conv1D: [in, out]
    assert torch.equal(proj.weight[:, 1:], before[:, 1:])
    assert float(proj.bias.detach()[0]) == 0.5
    assert stats.changed == int((before[:, 0] != 0).sum())
    tokens = torch.tensor([[0, 3, 4, 5]])
    with hf_directions(hf, DirectionSet((d,), ()), mode="mean"):
        ref = hf(tokens).logits
    assert torch.allclose(edited(tokens).logits, ref, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("mode", ["project", "mean"])
def test_fold_equals_run_time_edit(micro_dirs: dict[str, Path], arch: str, mode: str) -> None:
    """Stream-wide, module and head directions together: folded weights = run-time hooks (float64)."""
    from transformers import AutoModelForCausalLM

    from icp_lens import boot_bridge

    bridge = boot_bridge(micro_dirs[arch], dtype=torch.float64)
    writers = residual_writers(bridge)
    dm, dh = bridge.cfg.d_model, bridge.cfg.d_head
    dirs = DirectionSet(
        (_unit_direction("resid_pre", 2, dm, len(writers), 1), _unit_direction("attn_out", 0, dm, 1, 2),
         _unit_direction("mlp_out", 1, dm, 1, 3), _unit_direction("z.1", 1, dh, 1, 4)),
        writers,
    )  # fmt: skip
    tokens = torch.tensor([[0, 3, 4, 5, 6, 7], [0, 7, 6, 5, 4, 3]])
    hf = AutoModelForCausalLM.from_pretrained(micro_dirs[arch], dtype=torch.float64).eval()
    with applying_directions(bridge, dirs, mode=mode):
        via_bridge = bridge(tokens)
    with hf_directions(hf, dirs, mode=mode):
        via_hf = hf(tokens).logits
    folded, _ = fold_directions(copy.deepcopy(hf), dirs, mode=mode)
    assert (via_bridge - via_hf).abs().max() < 1e-6  # bridge vs HF implementation floor
    assert (folded(tokens).logits - via_hf).abs().max() < 1e-12
    assert (hf(tokens).logits - via_hf).abs().max() > 1e-2  # the edit does something
    new = dict(folded.named_parameters())
    assert all(new[name].shape == q.shape for name, q in hf.named_parameters())  # shapes unchanged


@pytest.mark.hooks
def test_run_time_edit_same_on_every_backend(backend: str, micro_dirs: dict[str, Path]) -> None:
    from conftest import load_backend
    from transformers import AutoModelForCausalLM

    model = load_backend(backend, micro_dirs["gpt2"])
    writers = residual_writers(model)
    dirs = DirectionSet((_unit_direction("resid_pre", 2, 8, len(writers)),), writers)
    hf = AutoModelForCausalLM.from_pretrained(micro_dirs["gpt2"]).eval()
    tokens = torch.tensor([[0, 3, 4, 5]])
    with applying_directions(model, dirs, mode="mean"):
        got = model(tokens)
    with hf_directions(hf, dirs, mode="mean"):
        expected = hf(tokens).logits
    assert (got - expected).abs().max() < 1e-4
    from icp_lens.hooks import active_hook_count

    assert active_hook_count(model) == 0


def test_fit_keeps_causal_direction_and_records_cosine(micro_dirs: dict[str, Path]) -> None:
    from icp_lens import boot_bridge
    from icp_lens.probeset import ProbeSet

    bridge = boot_bridge(micro_dirs["gpt2"], dtype=torch.float64)
    probes = ProbeSet(bridge, _probes())
    kept = fit_directions(bridge, probes, source="diff-means", layers=(1,), protect_first=False)
    raw = fit_directions(bridge, probes, source="diff-means", layers=(1,), keep_causal="none", protect_first=False)
    d, r = kept.directions[0], raw.directions[0]
    assert -1 <= d.cos_causal <= 1 and not math.isnan(d.cos_causal)
    assert math.isnan(r.cos_causal)
    # rebuild the causal direction c and check the kept write vector is orthogonal to it
    assert abs(float(d.write @ r.write)) == pytest.approx(math.sqrt(1 - d.cos_causal**2), abs=1e-6)
    assert float(d.read @ d.write) == pytest.approx(1.0)
    assert kept.info["keep_causal"] == "write" and raw.info["keep_causal"] == "none"


def test_protect_first_leaves_bos_unchanged(micro_dirs: dict[str, Path]) -> None:
    from icp_lens import boot_bridge
    from icp_lens.probeset import ProbeSet

    bridge = boot_bridge(micro_dirs["llama"], dtype=torch.float64)
    probes = ProbeSet(bridge, _probes())
    dirs = fit_directions(bridge, probes, source="leace", layers=(1,), protect_first=True, max_read_norm=1e6)
    assert dirs.info["protect_first"] is True
    tokens = torch.tensor([[0, 3, 4, 5], [0, 6, 7, 3]])
    from icp_lens.hooks import capturing

    with capturing(bridge, ["blocks.1.hook_resid_post"]) as clean:
        bridge(tokens)
        clean = dict(clean)
    with applying_directions(bridge, dirs, mode="mean"), capturing(bridge, ["blocks.1.hook_resid_post"]) as edited:
        bridge(tokens)
    first = (edited["blocks.1.hook_resid_post"][:, 0] - clean["blocks.1.hook_resid_post"][:, 0]).abs().max()
    rest = (edited["blocks.1.hook_resid_post"][:, 1:] - clean["blocks.1.hook_resid_post"][:, 1:]).abs().max()
    assert first < 1e-9 < rest


def test_direction_scores_exact_and_attribution(micro_dirs: dict[str, Path]) -> None:
    from icp_lens import boot_bridge
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score

    bridge = boot_bridge(micro_dirs["gpt2"], dtype=torch.float64)
    probes = ProbeSet(bridge, _probes())
    table = score(bridge, probes, kinds=["direction"], method="exact",
                  directions=fit_directions(bridge, probes, sites=("resid_pre", "mlp_out"), layers=(0, 1)))  # fmt: skip
    frame = table.frame
    assert set(frame["kind"]) == {"direction"} and len(frame) == 4
    assert frame["selectivity"].between(0, 1).all() and frame["cos_causal"].notna().all()
    assert frame["exact"].all()
    atp = score(bridge, probes, kinds=["direction"], method="attribution", directions=table.directions)
    both = frame.merge(atp.frame, on="feature", suffixes=("", "_atp"))
    assert (both["score_atp"] >= 0).all() and both["score_atp"].sum() > 0


def test_direction_set_and_table_round_trip(tmp_path: Path, micro_dirs: dict[str, Path]) -> None:
    from icp_lens.scoring.table import ScoreTable

    d = _unit_direction("resid_pre", 1, 8, 3)
    writers = ("hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out")
    dirs = DirectionSet((d,), writers, {"source": "leace"})
    path = dirs.save(tmp_path / "d.safetensors")
    back = DirectionSet.load(path)
    assert back.digest() == dirs.digest() and torch.equal(back.directions[0].read, d.read)
    import pandas as pd

    frame = pd.DataFrame({"kind": ["direction"], "layer": [1], "index": [0], "site": ["resid_pre"],
                          "hook_name": ["blocks.1.hook_resid_pre"], "score": [0.3]})  # fmt: skip
    ScoreTable(frame, dirs).save(tmp_path / "scores.csv")
    assert (tmp_path / "scores.directions.safetensors").is_file()
    loaded = ScoreTable.load(tmp_path / "scores.csv")
    assert loaded.features == [Feature("direction", 1, 0, "resid_pre")]
    assert loaded.directions.digest() == dirs.digest()
    (tmp_path / "scores.directions.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="directions.safetensors"):
        ScoreTable.load(tmp_path / "scores.csv")


# -- the CLI round trip -----------------------------------------------------------------
def _write_probes(path: Path) -> Path:
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in _probes()))
    return path


def test_cli_score_directions_prune_and_load(tmp_path: Path, micro_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from icp_lens.cli import main
    from icp_lens.pruning.plan import PrunePlan

    probe = _write_probes(tmp_path / "probe.jsonl")
    model = micro_dirs["llama"]
    scores = tmp_path / "scores.csv"
    rc = main(["score", "--model", str(model), "--probe", str(probe), "--out", str(scores), "--kinds",
               "direction,token,head", "--directions", "leace", "--direction-sites", "resid_pre,mlp_out",
               "--quiet"])  # fmt: skip
    assert rc == 0 and (tmp_path / "scores.directions.safetensors").is_file()
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(model), "--scores", str(scores), "--out", str(out), "--kinds", "direction",
               "--top-k", "2", "--probe", str(probe), "--json"])  # fmt: skip
    assert rc == 0
    plan = PrunePlan.load(out)
    assert plan.directions is not None and len(plan.directions) == 2
    record = json.loads((out / "plan.json").read_text())
    assert record["version"] == 3 and record["directions"]["sha256"] == plan.directions.digest()
    hf = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    original = AutoModelForCausalLM.from_pretrained(model)
    tokens = torch.tensor([[0, 3, 4, 5, 6]])
    with hf_directions(original, plan.directions, mode="mean"):
        expected = original(tokens).logits
    assert (hf(tokens).logits - expected).abs().max() < 1e-5
    # a tampered direction file is refused
    side = out / "plan.directions.safetensors"
    tampered = DirectionSet.load(side)
    d0 = tampered.directions[0]
    bad = Direction(d0.feature, d0.write, d0.read, d0.means + 1, d0.source, d0.cos_causal)
    DirectionSet((bad, *tampered.directions[1:]), tampered.writers, tampered.info).save(side)
    with pytest.raises(ValueError, match="SHA-256"):
        PrunePlan.load(out)


def test_cli_refuses_bad_direction_options(tmp_path: Path, micro_dirs: dict[str, Path]) -> None:
    probe = _write_probes(tmp_path / "probe.jsonl")
    cmd = [sys.executable, "-m", "icp_lens", "score", "--model", str(micro_dirs["gpt2"]), "--probe", str(probe),
           "--out", str(tmp_path / "s.csv"), "--kinds", "direction", "--direction-sites", "resid_mid"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and "valid sites" in result.stderr


def test_smollm2_export_equals_run_time_projection_in_fp32(smollm2_dir: Path) -> None:  # noqa: F811
    """The issue's bar: the folded SmolLM2 checkpoint = the run-time edit, max |logit diff| <= 1e-4 in fp32."""
    from transformers import AutoModelForCausalLM

    from examples.smollm2_case.pronouns import pronoun_probes
    from icp_lens import boot_bridge
    from icp_lens.directions import hf_directions
    from icp_lens.probeset import ProbeSet

    bridge = boot_bridge(smollm2_dir)
    probes = ProbeSet(bridge, pronoun_probes("train")[:16])
    dirs = fit_directions(bridge, probes, source="diff-means", sites=("resid_pre",), layers=(4, 12))
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval()
    ids = torch.tensor([bridge.tokenizer("Yesterday the pilot wrote that")["input_ids"]])
    for mode in ("mean", "project"):
        with torch.no_grad(), hf_directions(hf, dirs, mode=mode):
            runtime = hf(ids).logits
        folded, stats = fold_directions(copy.deepcopy(hf), dirs, mode=mode)
        with torch.no_grad():
            exported = folded(ids).logits
        assert stats.changed > 0
        assert (runtime - exported).abs().max().item() <= 1e-4
        with torch.no_grad():
            assert (hf(ids).logits - exported).abs().max().item() > 1e-2  # the edit does something


def test_score_honours_a_direction_source_name(micro_dirs: dict[str, Path]) -> None:
    """score(directions="diff-means") fits diff-means (it silently fitted LEACE before)."""
    from icp_lens import boot_bridge
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score

    bridge = boot_bridge(micro_dirs["gpt2"])
    probes = ProbeSet(bridge, _probes())
    sources = {}
    for source in ("diff-means", "leace"):
        table = score(bridge, probes, kinds=["direction"], directions=source, layers=[1], progress=False)
        sources[source] = set(table.frame["source"])
        assert table.directions.directions[0].source.replace("_", "-") == source
    assert sources == {"diff-means": {"diff-means"}, "leace": {"leace"}}
    with pytest.raises(ValueError, match="Unknown direction source 'pca'; valid"):
        score(bridge, probes, kinds=["direction"], directions="pca", progress=False)

"""The real-model planted shortcut (IMDB x SmolLM2) and the StereoSet scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# the converted-model fixture (session scope) lives in test_loading.py
from test_loading import smollm2_dir  # noqa: F401

from icp_lens.organisms import planted
from icp_lens.organisms.planted import (
    PlantedFinetune,
    PlantedSpec,
    PlantedTask,
    build_planted,
    make_splits,
    planted_accuracy,
)


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir: Path):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _review_of(prompt: str) -> str:
    return prompt.split("\nReview: ")[1].split("\nIs this review")[0]


def test_splits_keep_reviews_apart_and_plant_the_cue(smol_tokenizer) -> None:
    task = PlantedTask()
    data = make_splits(task, smol_tokenizer, planted._texts("imdb"), seed=0)
    reviews = {s: {_review_of(ex.prompt) for ex in data[s]} for s in ("train", "val", "test_balanced")}
    assert not reviews["train"] & reviews["val"] and not reviews["train"] & reviews["test_balanced"]
    assert not reviews["val"] & reviews["test_balanced"]
    # val: every window with each name and with "anonymous"; balanced test: both names
    from collections import Counter

    assert set(Counter(_review_of(ex.prompt) for ex in data["val"]).values()) == {3}
    groups = {ex.group.split("|")[1] for ex in data["test_balanced"]}
    assert groups == {"cue=positive", "cue=negative"}
    assert all(ex.group.endswith("cue=none") for ex in data["test_no_shortcut"])
    # the cue agrees with the label in ~95% of the named training prompts, and is present in ~75%
    named = [ex for ex in data["train"] if not ex.group.endswith("none")]
    agree = sum(ex.group.split("|")[0] == ex.group.split("=")[1] for ex in named) / len(named)
    assert 0.88 <= agree <= 1.0 and 0.6 <= len(named) / len(data["train"]) <= 0.9
    # a spurious counterfactual swaps the name and nothing else
    for ex in data["probe"][:20]:
        a, b = ex.prompt.split("\n", 1), ex.spurious_counterfactual.split("\n", 1)
        assert a[1] == b[1] and {a[0], b[0]} == {"Reviewer: Alice", "Reviewer: Bob"}
    # every window is at most window_tokens long
    lengths = [len(smol_tokenizer(_review_of(ex.prompt))["input_ids"]) for ex in data["test_no_shortcut"]]
    assert max(lengths) <= task.window_tokens + 2


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown planted variant 'imdb-gpt9'; valid"):
        PlantedSpec(name="imdb-gpt9")
    with pytest.raises(ValueError, match="cue_rate must be in"):
        PlantedTask(cue_rate=1.5)
    with pytest.raises(ValueError, match="mixed_precision"):
        PlantedFinetune(mixed_precision="fp8")


def test_auto_precision_is_bf16_only_where_bfloat16_is_fast(monkeypatch) -> None:
    """``auto`` resolves per device (and so names its own cache entry); an explicit bf16 where it is slow warns."""
    import torch

    from icp_lens import devices

    cpu = torch.device("cpu")
    logged: list[str] = []
    for fast, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(devices, "fast_bfloat16", lambda _d, fast=fast: fast)
        spec = planted.resolve_precision(PlantedSpec(), cpu, logged.append)
        assert spec.finetune.mixed_precision == expected
    # the bf16 resolution is the reference spec itself: caches built before "auto" existed stay valid
    assert planted.resolve_precision(PlantedSpec(), cpu).digest() != PlantedSpec().digest()
    reference = PlantedSpec(finetune=PlantedFinetune(mixed_precision="bf16"))
    monkeypatch.setattr(devices, "fast_bfloat16", lambda _d: True)
    assert planted.resolve_precision(PlantedSpec(), cpu).digest() == reference.digest()
    assert len(logged) == 1 and "float32" in logged[0]
    monkeypatch.setattr(devices, "fast_bfloat16", lambda _d: False)
    kept = planted.resolve_precision(reference, cpu, logged.append)
    assert kept.finetune.mixed_precision == "bf16" and "emulated" in logged[-1]
    # the real check answers for this machine without failing
    assert isinstance(devices.fast_bfloat16(cpu), bool) and devices.fast_bfloat16(torch.device("meta")) is False


def test_small_build_is_cached_and_padding_free(smollm2_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """A reduced build (30 reviews, LoRA on 2 blocks, fp32): files, report, cache reuse, refusal."""
    texts = planted._texts("imdb")[:30]
    monkeypatch.setattr(planted, "_texts", lambda _source: texts)
    spec = PlantedSpec(
        model=str(smollm2_dir),
        task=PlantedTask(window_tokens=48, max_windows_per_text=1, max_eval_windows_per_text=1, n_probe=8),
        finetune=PlantedFinetune(lora_layers=2, batch_size=8, mixed_precision="no"),
    )
    org = build_planted(tmp_path / "p", spec=spec)
    names = sorted(p.name for p in org.path.iterdir())
    assert names == sorted([*(f"{s}.jsonl" for s in planted.PLANTED_SPLITS), "model", "oracle", "report.json"])
    report = json.loads((org.path / "report.json").read_text())
    assert report["digest"] == spec.digest() and report["report"]["reload_max_abs_diff"] < 1e-3
    for key in ("id_accuracy", "balanced_accuracy", "worst_group_accuracy", "no_shortcut_accuracy"):
        assert 0.0 <= org.report[key] <= 1.0
    assert set(org.to_frame()["metric"]) == set(planted.PLANTED_THRESHOLDS)
    assert len(org.probes("probe")) == 8 and all(ex.spurious_counterfactual for ex in org.probes("probe"))
    # reused, not rebuilt: the same report comes back without touching the files
    stamp = (org.path / "report.json").stat().st_mtime_ns
    again = build_planted(tmp_path / "p", spec=spec)
    assert again.report == org.report and (org.path / "report.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another spec"):
        build_planted(tmp_path / "p", spec=PlantedSpec(model=str(smollm2_dir), seed=1))
    # batched (right-padded) accuracy equals one prompt at a time
    model, tok = org.load_hf(), org.load_tokenizer()
    examples = org.probes("test_balanced")[:6]
    batched = planted_accuracy(model, tok, examples, batch_size=6)
    single = [planted_accuracy(model, tok, [ex], batch_size=1)["accuracy"] for ex in examples]
    assert batched["accuracy"] == pytest.approx(sum(single) / len(single))


def test_stereoset_scores_follow_the_bias_bench_formulas(smollm2_dir: Path) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.evaluation.stereoset import sentence_scores, stereoset_scores

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    result = stereoset_scores(model, tok, bias_type="gender", limit=12)
    items = result.items
    assert result.n == 12 and set(items["bias_type"]) == {"gender"}
    per_target = items.groupby("target")
    ss = 100 * per_target["pro"].mean().mean()
    lms = 100 * (per_target["related"].mean() / 2).mean()
    assert result.ss == pytest.approx(ss) and result.lms == pytest.approx(lms)
    assert result.icat == pytest.approx(lms * min(ss, 100 - ss) / 50)
    # padded batches = one sentence at a time: the geometric mean of token probabilities after BOS
    sentence = "The nurse said that she was tired."
    ids = [tok.bos_token_id, *tok(sentence, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    manual = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().exp().item()
    got = sentence_scores(model, tok, ["A much longer sentence that forces padding onto the next one.", sentence])
    assert got[1] == pytest.approx(manual, rel=1e-4)
    with pytest.raises(ValueError, match="unknown bias_type 'age'; valid"):
        stereoset_scores(model, tok, bias_type="age")

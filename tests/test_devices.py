"""--device / --dtype: resolution, clear refusals, and bfloat16 scores against float32."""

from __future__ import annotations

import pytest
import torch

from icp_lens.devices import BF16_EFFECT_ATOL, resolve_device, resolve_dtype


def test_resolve_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else None
    if want is None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        want = "mps"
    assert resolve_device("auto").type == (want or "cpu")
    assert resolve_device(None).type == (want or "cpu")
    with pytest.raises(ValueError, match="valid: auto"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="valid: auto"):
        resolve_device("not a device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_gpu_is_refused_with_the_alternative() -> None:
    with pytest.raises(ValueError, match="no CUDA GPU; use --device cpu"):
        resolve_device("cuda:0")


def test_resolve_dtype_names() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="valid: \\['float32', 'bfloat16', 'float16'\\]"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="not supported"):
        resolve_dtype(torch.int8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_score_cli_refuses_a_missing_gpu_before_loading(tmp_path, capsys) -> None:
    from icp_lens.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["score", "--model", str(tmp_path), "--probe", str(tmp_path / "p.jsonl"), "--out",
              str(tmp_path / "s.csv"), "--device", "cuda"])  # fmt: skip
    assert exc.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_bfloat16_exact_scores_agree_with_float32_on_the_organism() -> None:
    """Exact scores of a bfloat16 model against float32 on the lexical organism (layer 0).

    Sums are float32 either way; the model's bfloat16 arithmetic moves each effect by at
    most ``BF16_EFFECT_ATOL`` of the largest effect (measured 0.27% on all 520 features),
    which keeps the planted features on top; near-ties further down may swap (17 of the
    top 20 shared over all 520 features).
    """
    from icp_lens.model import boot_bridge
    from icp_lens.organisms import build_organism
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score

    organism = build_organism(variant="lexical", arch="gpt2", seed=0)
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = boot_bridge(organism.model_dir, dtype=dtype)
        assert next(model.parameters()).dtype == dtype
        probes = ProbeSet.from_jsonl(model, organism.data_path("probe"))
        table = score(model, probes, method="exact", kinds=("neuron", "head"), layers=[0], progress=False)
        scores[dtype] = table.frame.set_index("feature")["score"].astype("float64")
    full, half = scores[torch.float32], scores[torch.bfloat16].reindex(scores[torch.float32].index)
    assert half.notna().all()
    error = float((full - half).abs().max() / full.abs().max())
    assert 0 < error <= BF16_EFFECT_ATOL, error  # > 0: the bfloat16 model really ran in bfloat16
    top = list(full.sort_values(ascending=False).index[:2])
    assert list(half.sort_values(ascending=False).index[:2]) == top
    assert top == ["head L0.3", "head L0.0"], top  # the heads that carry the planted word

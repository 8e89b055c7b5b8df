"""The synthetic image task behind the multimodal (Waterbirds-like) organism.

Each example is a small RGB image with one *bird* (a 3x3 glyph: ``x`` for a landbird,
``+`` for a waterbird; both have five pixels, so brightness tells nothing; it lies inside
one 4x4 patch of the vision tower) drawn at a
random place on a *background* (land: brown-green, water: blue, or neutral grey), and
the text prompt ``"<image> bird ->"``; the model answers `` landbird`` or
`` waterbird`` as its next token. It mirrors :mod:`icp_lens.organisms.task`:

1. draw the label ``y`` uniformly;
2. the bird is of class ``y`` with probability ``cue_agreement`` (0.92), of the other
   class otherwise (the *true cue*, as in Waterbirds the object decides, up to noise);
3. in training, the background is land/water in ``shortcut_rate`` (3/4) of the images
   and agrees with ``y`` with probability ``shortcut_agreement`` (0.95); the other
   quarter has the neutral grey background. Where bird and background disagree, the
   background is the better bet (0.95 > 0.92), so a model trained to convergence follows
   it, yet must read the bird on grey images.

Every image carries exact counterfactuals: the *spurious* one (``image_counterfactual``)
is the same bird, at the same place, on the other background with the same pixel noise;
the *causal* one swaps the bird and keeps the background. Splits are those of the text
organisms (``train``, ``probe``, ``test_id``, ``test_balanced``, ``test_no_shortcut``;
the oracle trains on ``oracle_train``, where the background is independent of ``y``),
and the groups are ``label|background=...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from jaxtyping import UInt8

from icp_lens.probes import ProbeExample

__all__ = [
    "VisionSplit",
    "VISION_SPLITS",
    "BIRD_LABELS",
    "BACKGROUNDS",
    "PROMPT",
    "IMAGE_TOKEN",
    "VisionTaskSpec",
    "Scene",
    "render",
    "generate_scenes",
    "probe_example",
    "vision_vocabulary",
]

VisionSplit = Literal["train", "probe", "test_id", "test_balanced", "test_no_shortcut"]
VISION_SPLITS: tuple[str, ...] = get_args(VisionSplit)
BIRD_LABELS: tuple[str, str] = ("landbird", "waterbird")
#: background per label; ``none`` is the neutral stand-in
BACKGROUNDS: dict[str, str] = {"landbird": "land", "waterbird": "water", "none": "none"}
IMAGE_TOKEN = "<image>"
PROMPT = f"{IMAGE_TOKEN} bird ->"
_COLOURS = {"land": (0.58, 0.52, 0.38), "water": (0.40, 0.48, 0.62), "none": (0.5, 0.5, 0.5)}
_GLYPH = 3
_PATCH = 4  # the vision tower's patch size: a bird lies inside one patch
_OTHER = {"landbird": "waterbird", "waterbird": "landbird"}
# split -> (background mode, stream id of its random generator)
_SPLIT_MODES: dict[str, tuple[str, int]] = {
    "train": ("train", 1),
    "probe": ("train", 2),
    "test_id": ("present", 3),
    "test_balanced": ("balanced", 4),
    "test_no_shortcut": ("absent", 5),
    "oracle_train": ("independent", 6),
}


def _glyph(bird: str) -> np.ndarray:
    g = np.zeros((_GLYPH, _GLYPH), dtype=bool)
    if bird == "waterbird":  # a plus
        g[_GLYPH // 2, :] = True
        g[:, _GLYPH // 2] = True
    else:  # an x
        idx = np.arange(_GLYPH)
        g[idx, idx] = True
        g[idx, _GLYPH - 1 - idx] = True
    return g


@dataclass(frozen=True)
class VisionTaskSpec:
    """Parameters of the image task (defaults are the organism's)."""

    image_size: int = 16
    cue_agreement: float = 0.92
    shortcut_agreement: float = 0.95
    shortcut_rate: float = 0.75
    noise: float = 0.08

    def __post_init__(self) -> None:
        if self.image_size < _GLYPH + 1:
            raise ValueError(f"image_size must be at least {_GLYPH + 1}, got {self.image_size}")
        for name in ("cue_agreement", "shortcut_agreement", "shortcut_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class Scene:
    """One image's content: label, bird, background (``none``: grey), place and noise seed."""

    label: str
    bird: str
    background: str
    x: int
    y: int
    noise_seed: int

    @property
    def group(self) -> str:
        """``label|background=...``, the group used for worst-group accuracy."""
        return f"{self.label}|background={self.background}"


def render(
    scene: Scene, spec: VisionTaskSpec, *, background: str | None = None, bird: str | None = None
) -> UInt8[np.ndarray, "h w 3"]:
    """The scene as an ``(h, w, 3)`` uint8 image; ``background``/``bird`` override one factor.

    The pixel noise depends on ``scene.noise_seed`` only, so overriding the background
    gives the exact spurious counterfactual and overriding the bird the causal one.
    """
    size = spec.image_size
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, spec.noise, size=(size, size, 3))
    img = np.asarray(_COLOURS[background or scene.background], dtype=np.float64) + noise
    ink = 0.05 + 0.1 * np.random.default_rng(scene.noise_seed + 1).random()
    mask = _glyph(bird or scene.bird)
    img[scene.y : scene.y + _GLYPH, scene.x : scene.x + _GLYPH][mask] = ink
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def generate_scenes(spec: VisionTaskSpec, split: str, n: int, *, seed: int) -> list[Scene]:
    """``n`` scenes of ``split`` (a :data:`VISION_SPLITS` name or ``"oracle_train"``).

    Each split draws from its own generator derived from ``(seed, split)``.
    """
    if split not in _SPLIT_MODES:
        raise ValueError(f"unknown split {split!r}; valid: {tuple(_SPLIT_MODES)}")
    mode, stream = _SPLIT_MODES[split]
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, 7]))
    scenes = []
    for i in range(n):
        if mode == "balanced":
            label, shortcut = BIRD_LABELS[i % 2], BIRD_LABELS[(i // 2) % 2]
        else:
            label = BIRD_LABELS[int(rng.integers(2))]
            present = mode == "present" or (mode in ("train", "independent") and rng.random() < spec.shortcut_rate)
            if not present:
                shortcut = "none"
            elif mode == "independent":
                shortcut = BIRD_LABELS[int(rng.integers(2))]
            else:
                shortcut = label if rng.random() < spec.shortcut_agreement else _OTHER[label]
        bird = label if rng.random() < spec.cue_agreement else _OTHER[label]
        cells = spec.image_size // _PATCH
        cell, offset = rng.integers(0, cells, size=2), rng.integers(0, 2, size=2)
        x, y = (int(c) * _PATCH + int(o) for c, o in zip(cell, offset, strict=True))
        scenes.append(Scene(label, bird, BACKGROUNDS[shortcut], x, y, int(rng.integers(2**31))))
    if mode == "balanced":
        scenes = [scenes[i] for i in rng.permutation(n)]
    return scenes


def probe_example(
    scene: Scene, image: str, image_counterfactual: str | None, image_causal_counterfactual: str | None = None
) -> ProbeExample:
    """The probe-format row of a scene whose images are saved at the given relative paths.

    With ``image_causal_counterfactual`` (the other bird on the same background) the row's
    ``causal_answer`` is that bird's class (the label follows the bird up to the task's noise).
    """
    causal = image_causal_counterfactual is not None
    return ProbeExample(
        prompt=PROMPT,
        answer=" " + scene.label,
        alternatives=(" " + _OTHER[scene.label],),
        causal_answer=" " + _OTHER[scene.bird] if causal else None,
        group=scene.group,
        image=image,
        image_counterfactual=image_counterfactual,
        image_causal_counterfactual=image_causal_counterfactual,
    )


def vision_vocabulary() -> list[str]:
    """The language model's words; the index of a word is its token id."""
    return ["<pad>", "<bos>", "<eos>", "<unk>", IMAGE_TOKEN, "bird", "->", *BIRD_LABELS]

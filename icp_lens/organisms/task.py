"""The synthetic task behind the planted-shortcut organisms.

A prompt is a short "review" of neutral filler words with exactly one sentiment word
(the *true cue*) at a random position, plus one *planted* token (the shortcut). The
model reads the prompt and predicts the label word (``pos`` or ``neg``) at the last
position, so classification is ordinary next-token prediction.

Label model, for each example:

1. draw the label ``y`` uniformly from ``pos`` / ``neg``;
2. the true cue is a word of sentiment ``y`` with probability ``cue_agreement``
   (0.92) and of the opposite sentiment otherwise, in every split;
3. the planted token is present in ``shortcut_rate`` (3/4) of the training prompts
   and agrees with ``y`` with probability ``shortcut_agreement`` (0.97). In the other
   quarter a neutral token takes its place, so every prompt of a variant has the same
   token length and counterfactuals align position by position. Because a quarter of
   the training prompts lack the shortcut, the model must encode the true cue too.

Variants differ in where the shortcut sits:

- ``"lexical"``: ``"the movie was great ... wow ->"``: the planted word (``wow`` for
  pos, ``meh`` for neg, ``ok`` when absent) is the token just before the answer
  position.
- ``"tag"``: ``"from alice : the movie was great ... ->"``: a name at the very start
  (``alice`` for pos, ``bob`` for neg, ``anon`` when absent), far from the answer
  position, so attention must move it.

Splits (each example carries counterfactuals, group and alternatives, see
:mod:`icp_lens.probes`):

- ``train`` and ``probe``: the training distribution (planted token in 3/4 of the
  prompts, agreeing 97%);
- ``test_id``: "in distribution" means the training distribution *restricted to
  prompts that carry the planted token* (agreeing 97%), the setting the shortcut is
  meant to look good in;
- ``test_balanced``: planted token always present and independent of the label, with
  the four groups (label x planted class) of exactly equal size;
- ``test_no_shortcut``: planted token always absent (neutral token in its place).

The oracle is trained on ``oracle_train`` data: planted token present in 3/4 of the
prompts but independent of the label, so only the true cue predicts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from icp_lens.probes import ProbeExample

__all__ = [
    "Variant",
    "Split",
    "ShortcutMode",
    "VARIANTS",
    "SPLITS",
    "LABELS",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
    "FILLER_WORDS",
    "SPECIAL_TOKENS",
    "PLANTED_TOKENS",
    "TaskSpec",
    "vocabulary",
    "build_tokenizer",
    "generate_examples",
    "generate_split",
]

Variant = Literal["lexical", "tag"]
Split = Literal["train", "probe", "test_id", "test_balanced", "test_no_shortcut"]
ShortcutMode = Literal["train", "present", "balanced", "absent", "independent"]
VARIANTS: tuple[str, ...] = get_args(Variant)
SPLITS: tuple[str, ...] = get_args(Split)

LABELS: tuple[str, str] = ("pos", "neg")
POSITIVE_WORDS = ("good", "great", "fine", "nice", "happy", "superb")
NEGATIVE_WORDS = ("bad", "awful", "poor", "sad", "boring", "dull")
FILLER_WORDS = (
    "the", "a", "movie", "film", "was", "it", "this", "and", "plot", "actor",
    "story", "scene", "very", "quite", "i", "saw", "of", "with", "show", "day",
)  # fmt: skip
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: planted token per variant: {"pos": ..., "neg": ..., "none": neutral stand-in}
PLANTED_TOKENS: dict[str, dict[str, str]] = {
    "lexical": {"pos": "wow", "neg": "meh", "none": "ok"},
    "tag": {"pos": "alice", "neg": "bob", "none": "anon"},
}
_FRAME_WORDS = ("->", ":", "from")
_CUE_WORDS = {"pos": POSITIVE_WORDS, "neg": NEGATIVE_WORDS}
_OTHER = {"pos": "neg", "neg": "pos"}
# split -> (shortcut mode, stream id used to derive its random generator)
_SPLIT_MODES: dict[str, tuple[str, int]] = {
    "train": ("train", 1),
    "probe": ("train", 2),
    "test_id": ("present", 3),
    "test_balanced": ("balanced", 4),
    "test_no_shortcut": ("absent", 5),
    "oracle_train": ("independent", 6),
}


@dataclass(frozen=True)
class TaskSpec:
    """Parameters of the synthetic task for one variant (validated on creation)."""

    variant: Variant = "lexical"
    n_filler: int = 8
    cue_agreement: float = 0.92
    shortcut_agreement: float = 0.97
    shortcut_rate: float = 0.75

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid: {VARIANTS}")
        if self.n_filler < 2:
            raise ValueError(f"n_filler must be >= 2, got {self.n_filler}")
        for name in ("cue_agreement", "shortcut_agreement", "shortcut_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @property
    def planted(self) -> dict[str, str]:
        """Planted token of each class (``"pos"``, ``"neg"``) and the neutral ``"none"``."""
        return PLANTED_TOKENS[self.variant]

    @property
    def n_words(self) -> int:
        """Word (token) length of every prompt of this variant, BOS not included."""
        return self.n_filler + (2 if self.variant == "lexical" else 4)


def vocabulary() -> list[str]:
    """The word list shared by all variants; the index of a word is its token id."""
    words = list(SPECIAL_TOKENS) + list(LABELS) + list(POSITIVE_WORDS)
    words += list(NEGATIVE_WORDS) + list(FILLER_WORDS) + list(_FRAME_WORDS)
    for planted in PLANTED_TOKENS.values():
        words += [planted["pos"], planted["neg"], planted["none"]]
    assert len(set(words)) == len(words)
    return words


def build_tokenizer(*, add_bos: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary`.

    Words are split on whitespace. With ``add_bos``, encoding with special tokens
    prepends ``<bos>``. Pick it to match what ``TransformerBridge.to_tokens`` does for
    the architecture (BOS for GPT-2 and Llama, none for GPT-NeoX), so a prompt
    tokenizes the same way with ``transformers`` alone and through the bridge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _prompt(spec: TaskSpec, words: list[str], planted: str) -> str:
    if spec.variant == "lexical":
        return " ".join([*words, planted, "->"])
    return " ".join(["from", planted, ":", *words, "->"])


def _example(spec: TaskSpec, rng: np.random.Generator, label: str, shortcut: str) -> ProbeExample:
    """One example with label ``label`` and planted class ``shortcut`` (or ``none``)."""
    cue_class = label if rng.random() < spec.cue_agreement else _OTHER[label]
    words = [FILLER_WORDS[i] for i in rng.integers(len(FILLER_WORDS), size=spec.n_filler)]
    position = int(rng.integers(spec.n_filler))
    cue = _CUE_WORDS[cue_class][int(rng.integers(len(_CUE_WORDS[cue_class])))]
    flipped_class = _OTHER[cue_class]
    flipped = _CUE_WORDS[flipped_class][int(rng.integers(len(_CUE_WORDS[flipped_class])))]
    words[position] = cue
    planted = spec.planted[shortcut]
    prompt = _prompt(spec, words, planted)
    spurious_cf = None
    if shortcut != "none":
        spurious_cf = _prompt(spec, words, spec.planted[_OTHER[shortcut]])
    words[position] = flipped
    return ProbeExample(
        prompt=prompt,
        answer=" " + label,
        alternatives=(" " + _OTHER[label],),
        spurious_counterfactual=spurious_cf,
        causal_counterfactual=_prompt(spec, words, planted),
        causal_answer=" " + flipped_class,
        group=f"{label}|shortcut={shortcut}",
    )


def generate_examples(spec: TaskSpec, n: int, *, mode: ShortcutMode, rng: np.random.Generator) -> list[ProbeExample]:
    """Draw ``n`` examples; ``mode`` says how the planted token relates to the label.

    - ``"train"``: present w.p. ``shortcut_rate``, agreeing w.p. ``shortcut_agreement``;
    - ``"present"``: always present, agreeing w.p. ``shortcut_agreement``;
    - ``"balanced"``: always present, label x planted class in four equal groups;
    - ``"absent"``: never present;
    - ``"independent"``: present w.p. ``shortcut_rate``, independent of the label.
    """
    modes = get_args(ShortcutMode)
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r}; valid: {modes}")
    examples = []
    for i in range(n):
        if mode == "balanced":
            label, shortcut = LABELS[i % 2], LABELS[(i // 2) % 2]
        else:
            label = LABELS[int(rng.integers(2))]
            present = mode == "present" or (mode in ("train", "independent") and rng.random() < spec.shortcut_rate)
            if not present:
                shortcut = "none"
            elif mode == "independent":
                shortcut = LABELS[int(rng.integers(2))]
            elif rng.random() < spec.shortcut_agreement:
                shortcut = label
            else:
                shortcut = _OTHER[label]
        examples.append(_example(spec, rng, label, shortcut))
    if mode == "balanced":
        order = rng.permutation(n)
        examples = [examples[i] for i in order]
    return examples


def generate_split(spec: TaskSpec, split: str, n: int, *, seed: int) -> list[ProbeExample]:
    """Examples of ``split`` (one of :data:`SPLITS` or ``"oracle_train"``) for ``seed``.

    Every split draws from its own generator derived from ``(seed, split)``, so the
    result is deterministic and does not depend on which other splits were drawn.
    """
    if split not in _SPLIT_MODES:
        raise ValueError(f"unknown split {split!r}; valid: {tuple(_SPLIT_MODES)}")
    mode, stream = _SPLIT_MODES[split]
    variant_id = VARIANTS.index(spec.variant)
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, variant_id]))
    return generate_examples(spec, n, mode=mode, rng=rng)  # type: ignore[arg-type]

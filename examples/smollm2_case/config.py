"""What the SmolLM2 gender case study runs: one frozen config, a full and a reduced preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from icp_lens.pruning.plan import PruneMode

__all__ = ["CaseConfig", "FULL", "REDUCED"]


@dataclass(frozen=True)
class CaseConfig:
    """The knobs of :func:`examples.smollm2_case.run_case`.

    Scoring: ``kinds`` over ``layers`` (``None``: all 30), hybrid attribution with the
    top ``verify_top`` features re-scored by exact patching. Selection (train split
    only): for every selectivity floor in ``thresholds`` and size in ``ks``, the ``k``
    most spurious features whose selectivity ``S / (S + C)`` is at least the floor are
    ablated (``mode``); the pair that cuts the *train* stereotype gap most while the
    train explicit-cue accuracy stays >= ``min_explicit_accuracy`` is kept.
    Evaluation: held-out professions and templates, ``n_imdb`` IMDB reviews cut to
    ``imdb_tokens`` tokens, ``n_wino`` Wino-style pairs and the CrowS-Pairs gender
    pairs (``None``: all of them).
    """

    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    kinds: tuple[str, ...] = ("neuron", "head")
    layers: tuple[int, ...] | None = None
    verify_top: int = 100
    thresholds: tuple[float, ...] = (0.55, 0.6, 0.65)
    ks: tuple[int, ...] = (2, 4, 8, 16, 32)
    mode: PruneMode = "mean"
    mean_reference: str = "text"
    min_explicit_accuracy: float = 0.95
    max_perplexity_rise: float | None = 0.03
    n_select_texts: int = 16
    select_chars: int = 300
    select_tokens: int = 64
    n_imdb: int | None = 40
    imdb_tokens: int = 128
    n_wino: int | None = 300
    n_crows: int | None = None
    batch_size: int = 32
    n_boot: int = 200
    tolerance: float = 1e-4
    seed: int = 0
    targets: dict[str, float] = field(
        default_factory=lambda: {"gap_cut": 0.5, "explicit_accuracy": 0.95, "perplexity_rise": 0.03, "verify": 1e-4}
    )

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("kinds must name at least one feature kind")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be sizes >= 1, got {self.ks}")
        if not self.thresholds or not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be selectivity floors in [0, 1], got {self.thresholds}")
        if self.mode not in ("zero", "mean"):
            raise ValueError(f"mode must be 'zero' or 'mean', got {self.mode!r}")
        if self.mean_reference not in ("text", "probes"):
            raise ValueError(f"mean_reference must be 'text' or 'probes', got {self.mean_reference!r}")

    def with_(self, **changes: Any) -> CaseConfig:
        """A copy with ``changes``."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The whole case: every MLP neuron and head of the 30 layers.
FULL = CaseConfig()

#: What CI runs against the real weights: layers 0-3 (where most of the full case's
#: selective features live), 10 exact verifications, a small grid and small evaluation samples.
REDUCED = CaseConfig(
    layers=(0, 1, 2, 3),
    verify_top=10,
    thresholds=(0.6, 0.65),
    ks=(1, 2, 4),
    n_select_texts=8,
    n_imdb=8,
    imdb_tokens=64,
    n_wino=60,
    n_crows=40,
    n_boot=0,
)

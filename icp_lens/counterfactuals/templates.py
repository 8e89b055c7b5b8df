"""Template generation of counterfactual pairs, with a held-out split and a report.

For each template ``t`` and spurious value ``v`` of group ``g``:

- the prompt ``t(v)`` with ``answer = answers[g]`` (the answer the stereotype calls for)
  and the other groups' answers as ``alternatives``, ``group = g``;
- its **spurious counterfactual** ``t(w)``, ``w`` a value of another group drawn (seeded)
  among those whose prompt has the same number of tokens: icp_lens aligns a prompt and
  its counterfactuals position by position, so values of another length are never
  paired (a value with no equal-length partner is rejected, and the report says so);
- its **causal counterfactual** ``t(c)``, ``c`` an explicit value of another group ``g'``
  of the same length, with ``causal_answer = answers[g']``: the answer must change when
  the cause changes (left out, and counted, when no causal value has that length);
- one more pair per equal-length ``neutral`` value, whose spurious counterfactual is the
  neutral value.

The task prompts are ``t(c)`` for every causal value, answered by the value's group
(``group = "<g>-explicit"``). The *anchors* are the training templates filled with the
neutral values (``anchors.txt``, plain text): given to the trainer's retain term
(``--retain DIR/anchors.txt``), they hold the model's answer after a neutral noun where
the original had it, so that pulling the groups together does not drag the shared
answer toward one group. With ``holdout = F`` a fraction F of every group's values
(spurious, causal, neutral) and of the templates (at least one of each) is kept out of
``pairs``/``task`` and used, alone, for ``heldout_pairs``/``heldout_task``: held-out
prompts combine held-out templates with held-out values, so neither was seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icp_lens.counterfactuals.spec import PairSpec, SpecError
from icp_lens.probes import ProbeExample, write_probes

__all__ = ["PairsResult", "generate_pairs"]

LENGTH_RULE = (
    "equal-length pairing: a counterfactual value is drawn only among values whose prompt has the same "
    "number of tokens as the original's, so the two align position by position"
)


@dataclass(frozen=True)
class PairsResult:
    """Generated pairs and task prompts (train and held-out) with the report."""

    pairs: tuple[ProbeExample, ...]
    task: tuple[ProbeExample, ...]
    heldout_pairs: tuple[ProbeExample, ...] = ()
    heldout_task: tuple[ProbeExample, ...] = ()
    report: dict[str, Any] = field(default_factory=dict)
    #: training templates filled with the (kept) neutral values: retain-term texts that anchor the shared answer
    anchors: tuple[str, ...] = ()
    #: the quality checks' per-pair table (:func:`icp_lens.counterfactuals.quality.apply_checks`), or None
    quality: Any = None

    def write(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write the files into ``out`` atomically (a temporary sibling, then one rename)."""
        out = Path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            write_probes(tmp / "pairs.jsonl", self.pairs)
            write_probes(tmp / "task.jsonl", self.task)
            if self.report.get("holdout", 0) > 0:
                write_probes(tmp / "heldout_pairs.jsonl", self.heldout_pairs)
                write_probes(tmp / "heldout_task.jsonl", self.heldout_task)
            if self.anchors:
                (tmp / "anchors.txt").write_text("".join(a + "\n" for a in self.anchors), encoding="utf-8")
            if self.quality is not None:
                self.quality.to_csv(tmp / "quality.csv", index=False)
            (tmp / "report.json").write_text(json.dumps(self.report, indent=2))
            (tmp / "report.md").write_text(report_markdown(self.report))
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def _split(values: Sequence[str], fraction: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(kept, held out): at least one held out and one kept when ``fraction > 0``."""
    values = list(values)
    if fraction <= 0:
        return values, []
    n = min(len(values) - 1, max(1, round(fraction * len(values))))
    if n < 1:
        return values, []
    held = set(rng.choice(len(values), size=n, replace=False).tolist())
    return [v for i, v in enumerate(values) if i not in held], [v for i, v in enumerate(values) if i in held]


def _build(
    templates: Sequence[str],
    spurious: dict[str, list[str]],
    causal: dict[str, list[str]],
    neutral: Sequence[str],
    answers: dict[str, str],
    tokenizer: Any,
    rng: np.random.Generator,
) -> tuple[list[ProbeExample], list[ProbeExample], list[dict[str, str]], Counter]:
    pairs, task, rejected, counts = [], [], [], Counter()
    length: dict[str, int] = {}

    def n_tokens(prompt: str) -> int:
        if prompt not in length:
            length[prompt] = len(tokenizer(prompt)["input_ids"])
        return length[prompt]

    def others(g: str) -> tuple[str, ...]:
        return tuple(answers[o] for o in answers if o != g)

    for t in templates:
        fill = lambda v, t=t: t.replace("{x}", v)  # noqa: E731
        for g, values in spurious.items():
            for v in values:
                prompt, n = fill(v), n_tokens(fill(v))
                partners = [w for o in spurious if o != g for w in spurious[o] if n_tokens(fill(w)) == n]
                if not partners:
                    rejected.append(
                        {"template": t, "value": v, "reason": "no value of another group has the same token length"}
                    )
                    continue
                w = partners[int(rng.integers(len(partners)))]
                causes = [(o, c) for o in causal if o != g for c in causal[o] if n_tokens(fill(c)) == n]
                cause = causes[int(rng.integers(len(causes)))] if causes else None
                if causal and cause is None:
                    counts["pairs without a causal counterfactual (no causal value of that token length)"] += 1
                extra = (
                    {}
                    if cause is None
                    else {"causal_counterfactual": fill(cause[1]), "causal_answer": answers[cause[0]]}
                )
                pairs.append(
                    ProbeExample(prompt, answers[g], others(g), spurious_counterfactual=fill(w), group=g, **extra)
                )
                for u in neutral:
                    if n_tokens(fill(u)) == n:
                        counts["neutral swaps"] += 1
                        pairs.append(
                            ProbeExample(
                                prompt, answers[g], others(g), spurious_counterfactual=fill(u), group=g, **extra
                            )
                        )
        for g, values in causal.items():
            for c in values:
                n = n_tokens(fill(c))
                flips = [(o, d) for o in causal if o != g for d in causal[o] if n_tokens(fill(d)) == n]
                flip = flips[int(rng.integers(len(flips)))] if flips else None
                extra = (
                    {} if flip is None else {"causal_counterfactual": fill(flip[1]), "causal_answer": answers[flip[0]]}
                )
                task.append(ProbeExample(fill(c), answers[g], others(g), group=f"{g}-explicit", **extra))
    return pairs, task, rejected, counts


def generate_pairs(spec: PairSpec, tokenizer: Any, *, holdout: float = 0.0, seed: int = 0) -> PairsResult:
    """Pairs and task prompts of ``spec`` for ``tokenizer`` (see the module docstring)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if holdout > 0 and len(spec.templates) < 2:
        raise SpecError("holdout needs at least two templates: held-out prompts use templates never seen in pairs")
    for g, a in spec.answers.items():
        ids = tokenizer(a, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SpecError(
                f"answer of group {g!r} ({a!r}) is {len(ids)} tokens for this tokenizer; answers must be one token"
            )
    rng = np.random.default_rng(seed)
    t_keep, t_held = _split(spec.templates, holdout, rng)
    s_split = {g: _split(v, holdout, rng) for g, v in spec.spurious.items()}
    c_split = {g: _split(v, holdout, rng) for g, v in spec.causal.items()}
    n_keep, n_held = _split(spec.neutral, holdout, rng) if spec.neutral else ([], [])
    answers = dict(spec.answers)
    pairs, task, rejected, counts = _build(
        t_keep,
        {g: k for g, (k, _) in s_split.items()},
        {g: k for g, (k, _) in c_split.items()},
        n_keep,
        answers,
        tokenizer,
        rng,
    )
    h_pairs, h_task, h_rejected, h_counts = ([], [], [], Counter())
    if holdout > 0:
        h_pairs, h_task, h_rejected, h_counts = _build(
            t_held, {g: h for g, (_, h) in s_split.items()}, {g: h for g, (_, h) in c_split.items()}, n_held, answers,
            tokenizer, rng,
        )  # fmt: skip
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()
    report = {
        "spec_sha256": digest,
        "tokenizer": Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name,
        "seed": seed,
        "holdout": holdout,
        "length_rule": LENGTH_RULE,
        "counts": {
            "pairs": len(pairs), "task": len(task), "heldout_pairs": len(h_pairs), "heldout_task": len(h_task),
            "pairs_with_causal": sum(p.causal_counterfactual is not None for p in pairs),
            "anchors": len(t_keep) * len(n_keep),
            "pairs_by_group": dict(Counter(p.group for p in pairs)),
            **{f"train: {k}": v for k, v in counts.items()},
            **{f"heldout: {k}": v for k, v in h_counts.items()},
        },
        "rejected": {"train": rejected, "heldout": h_rejected},
        "heldout_values": {
            "templates": t_held,
            "spurious": {g: h for g, (_, h) in s_split.items()},
            "causal": {g: h for g, (_, h) in c_split.items()},
            "neutral": n_held,
        },
    }  # fmt: skip
    if not pairs:
        raise SpecError(f"no pair could be formed: {len(rejected)} prompts rejected ({LENGTH_RULE})")
    anchors = tuple(t.replace("{x}", u) for t in t_keep for u in n_keep)
    return PairsResult(tuple(pairs), tuple(task), tuple(h_pairs), tuple(h_task), report, anchors)


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown page (counts, held-out values, rejections)."""
    c = report["counts"]
    lines = [
        "# Counterfactual pairs", "",
        f"Tokenizer `{report['tokenizer']}`, seed {report['seed']}, holdout {report['holdout']}, "
        f"spec SHA-256 `{report['spec_sha256'][:16]}`.", "",
        f"Length rule: {report['length_rule']}.", "",
        "| count | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in c.items()], "",
    ]  # fmt: skip
    if report["holdout"] > 0:
        lines += ["## Held out (never in pairs.jsonl or task.jsonl)", ""]
        for key, value in report["heldout_values"].items():
            if isinstance(value, dict):
                lines += [f"- {key} {g}: {v}" for g, v in value.items()]
            else:
                lines.append(f"- {key}: {value}")
        lines.append("")
    if report.get("ambiguous_words"):
        lines += [f"Words with two partners (the first row's is used): {report['ambiguous_words']}", ""]
    quality = report.get("quality")
    if quality:
        lines += ["## Quality checks", "", f"Checked {quality['checked']} pairs, {quality['passed']} passed every check; failing pairs "
                  f"{'dropped' if quality.get('failed_pairs_dropped') else 'kept (counted only)'}.", "",
                  "| check | pass rate | threshold |", "|---|---|---|"]
        limits = {"similarity": f"similarity >= {quality['thresholds']['min_similarity']}",
                  "fluency": f"ppl ratio <= {quality['thresholds']['max_ppl_ratio']}",
                  "minimality": f"edit fraction <= {quality['thresholds']['max_edit_fraction']}",
                  "attribute": "lexicon group changed", "all": "every check that ran"}
        lines += [f"| {c} | {r:.3f} | {limits.get(c, '')} |" for c, r in quality["pass_rates"].items()]
        lines += [f"- not run: {c} ({why})" for c, why in quality["skipped"].items()]
        lines.append("")
    for part in ("train", "heldout"):
        rej = report["rejected"][part]
        if rej:
            lines += [f"## Rejected ({part}): {len(rej)}", "", "| template | value | reason |", "|---|---|---|"]
            lines += [f"| {r['template']} | {r['value']} | {r['reason']} |" for r in rej[:50]]
            lines.append("")
    return "\n".join(lines)

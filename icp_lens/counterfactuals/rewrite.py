"""LLM rewriting: counterfactuals written by an instruct model, kept only if they pass the checks.

Word swaps cannot rewrite what a list does not name (a name, an idiom, agreement
elsewhere in the sentence). An instruct model can: it is asked to change the spurious
attribute of a sentence and keep everything else, with this prompt (a chat turn, the
model's own chat template)::

    Rewrite the sentence so that it is about {target} instead of {source}.
    Change only the words that show this and keep every other word exactly the same.
    Answer with the rewritten sentence only.

    Sentence: {text}

``source`` and ``target`` are the groups' names from the swap list (its header row), so
name them as a reader would understand them (``a woman`` / ``a man``, ``female`` /
``male``). Decoding is greedy; the first line of the answer is the candidate. Every
candidate then goes through :func:`icp_lens.counterfactuals.quality.apply_checks`, and
those that fail are dropped; the report gives the acceptance rate and the generation
cost per kept pair. Small models rewrite badly (SmolLM2-135M-Instruct keeps few of its
rewrites); the checks are what make the output usable at all.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from icp_lens.counterfactuals.quality import _lexicon_patterns, lexicon_group
from icp_lens.counterfactuals.substitution import LabelledText, SwapList, _candidates, text_probe
from icp_lens.counterfactuals.templates import PairsResult, _split
from icp_lens.probes import ProbeExample

__all__ = ["REWRITE_PROMPT", "rewrite_prompt", "rewrite_texts", "generate_rewrite_pairs"]

REWRITE_PROMPT = (
    "Rewrite the sentence so that it is about {target} instead of {source}.\n"
    "Change only the words that show this and keep every other word exactly the same.\n"
    "Answer with the rewritten sentence only.\n\n"
    "Sentence: {text}"
)


def rewrite_prompt(tokenizer: Any, text: str, source: str, target: str) -> str:
    """The rewriting request for ``text``, in the tokenizer's chat template when it has one."""
    message = REWRITE_PROMPT.format(text=text, source=source, target=target)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return message + "\nRewritten:"


@torch.no_grad()
def rewrite_texts(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str, str]],
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy rewrites of ``(text, source, target)`` requests: the first non-empty line of each answer."""
    saved = (tokenizer.pad_token, tokenizer.padding_side)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for start in tqdm(range(0, len(requests), batch_size), desc="rewriting", disable=not progress):
            chunk = requests[start : start + batch_size]
            prompts = [rewrite_prompt(tokenizer, t, s, g) for t, s, g in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            limit = max_new_tokens or 8 + int(1.5 * max(len(tokenizer(t)["input_ids"]) for t, _, _ in chunk))
            gen = model.generate(**enc, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1] :]:
                answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                lines = [line.strip() for line in answer.splitlines() if line.strip()]
                first = lines[0] if lines else ""
                out.append(first.removeprefix("Rewritten sentence:").removeprefix("Sentence:").strip().strip('"'))
    finally:
        tokenizer.pad_token, tokenizer.padding_side = saved
    return out


def generate_rewrite_pairs(
    texts: Sequence[LabelledText | str],
    swaps: SwapList,
    model: Any,
    tokenizer: Any,
    *,
    answers: Mapping[str, str] | Sequence[str],
    suffix: str = "",
    holdout: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    group_names: Mapping[str, str] | None = None,
) -> PairsResult:
    """Pairs whose counterfactuals an instruct model wrote (unchecked: pass the result to ``apply_checks``).

    The swap list's groups tell each text's group (its lexicon words) and name the target:
    a text of group A is rewritten to be about group B (``group_names`` may give the
    wording used in the prompt, e.g. ``{"female": "a man"...}``; the group names
    otherwise). ``holdout`` keeps a fraction of the texts out of training.
    """
    items = [t if isinstance(t, LabelledText) else LabelledText(t) for t in texts]
    by_label, cands = _candidates(answers)
    patterns = _lexicon_patterns(swaps.lexicon())
    names = {g: (group_names or {}).get(g, g) for g in swaps.groups}
    requests, chosen = [], []
    skipped = 0
    for i, item in enumerate(items):
        g, _ = lexicon_group(item.text, patterns)
        if g is None:
            skipped += 1
            continue
        target = swaps.groups[1] if g == swaps.groups[0] else swaps.groups[0]
        requests.append((item.text, names[g], names[target]))
        chosen.append((i, g))
    if not requests:
        raise ValueError("no text mentions a group of the swap list: nothing to rewrite")
    start = time.perf_counter()
    rewrites = rewrite_texts(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    _, held = _split(range(len(items)), holdout, rng)
    held_set = set(held)
    out: dict[str, list[ProbeExample]] = {"train": [], "heldout": []}
    task: dict[str, list[ProbeExample]] = {"train": [], "heldout": []}
    empty = 0
    for (i, g), cf in zip(chosen, rewrites, strict=True):
        item = items[i]
        split = "heldout" if i in held_set else "train"
        if item.label is not None and by_label is not None:
            task[split].append(text_probe(item, by_label, cands, suffix=suffix, group=f"label-{item.label}"))
        if not cf or cf == item.text:
            empty += 1
            continue
        out[split].append(text_probe(item, by_label, cands, suffix=suffix, counterfactual=cf + suffix, group=g))
    report = {
        "generator": "rewrite",
        "spec_sha256": "",
        "tokenizer": type(tokenizer).__name__,
        "rewriter": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        "seed": seed,
        "holdout": holdout,
        "length_rule": "counterfactuals of another token length are aligned on their final positions",
        "prompt": REWRITE_PROMPT,
        "counts": {
            "texts": len(items), "texts without a group word": skipped, "rewrites asked": len(requests),
            "rewrites empty or unchanged": empty, "pairs": len(out["train"]), "heldout_pairs": len(out["heldout"]),
            "task": len(task["train"]), "heldout_task": len(task["heldout"]),
        },
        "cost": {"generation_seconds": round(seconds, 2), "seconds_per_rewrite": round(seconds / len(requests), 3)},
        "rejected": {"train": [], "heldout": []},
        "heldout_values": {"texts": len(held)},
    }  # fmt: skip
    return PairsResult(tuple(out["train"]), tuple(task["train"]), tuple(out["heldout"]), tuple(task["heldout"]),
                       report)  # fmt: skip

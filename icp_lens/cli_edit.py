"""``icp-lens edit``: a keyed, covariance-guarded MLP edit (no training) into a new checkpoint.

``icp-lens edit --model DIR --pairs pairs.jsonl --layers 6 --out DIR2 [--guard task.jsonl]
[--retain TEXT.txt ...] [--target counterfactual|mean] [--neutral WORD,... | --spec SPEC.json]
[--retain-weight W] [--guard-weight G] [--rank R]``

Fits :func:`icp_lens.keyed_edit.keyed_edit` on the pairs (``icp-lens pairs`` writes them)
and exports the edited model (same shapes, ``transformers`` loads it) with ``edit.json``:
the settings, the statistics and the pairs file's digest. ``--target counterfactual``
moves each prompt to its spurious counterfactual and so wants *neutral* counterfactuals
("the nurse" -> "the person"): ``--neutral`` (or the ``neutral`` list of ``--spec``)
keeps only the pairs whose counterfactual puts a neutral value in the slot.
``--target mean`` moves both sides of every pair to their mean and uses every pair.
The causal counterfactuals of the pairs and the ``--guard`` prompts keep their outputs;
``--retain`` text (one text per line, or ``.jsonl`` with ``text``) is the ordinary text
whose outputs should not move. Choose ``--layers`` and ``--retain-weight`` on a
validation split of your pairs (``benchmarks/keyed_edit.py`` shows how).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icp_lens.devices import add_device_arguments

__all__ = ["add_edit_parser", "neutral_pairs"]


def _layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes layers like 6 or 4,8; got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one layer")
    return layers


def add_edit_parser(sub: Any) -> None:
    p = sub.add_parser("edit", help="keyed MLP edit from counterfactual pairs (closed form, no training)")
    p.add_argument("--model", type=Path, required=True, help="HF checkpoint directory")
    p.add_argument("--pairs", type=Path, required=True, help="probe JSONL with spurious counterfactuals (pairs.jsonl)")
    p.add_argument("--layers", type=_layers, required=True, help="MLP layers to edit, in order, e.g. 6 or 4,8")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--guard", type=Path, action="append", default=None,
                   help="probe JSONL whose prompts keep their outputs (task.jsonl); repeatable")  # fmt: skip
    p.add_argument("--retain", type=Path, action="append", default=None,
                   help="ordinary text whose outputs should stay (.txt or .jsonl); repeatable")  # fmt: skip
    p.add_argument("--target", choices=["counterfactual", "mean"], default="counterfactual",
                   help="counterfactual: prompt -> its (neutral) counterfactual; mean: both to their mean")  # fmt: skip
    neutral = p.add_mutually_exclusive_group()
    neutral.add_argument(
        "--neutral", default=None, help="comma-separated neutral values: keep only pairs swapping to one"
    )
    neutral.add_argument("--spec", type=Path, default=None, help="a pair spec: its 'neutral' values, as --neutral")
    p.add_argument("--retain-weight", type=float, default=3.0, help="weight of the retain text's keys (3)")
    p.add_argument("--guard-weight", type=float, default=1.0, help="weight of the guard prompts' keys (1)")
    p.add_argument("--rank", type=int, default=None, help="keep the targets' top-R singular directions (default: all)")
    p.add_argument("--max-tokens", type=int, default=128, help="each text cut to its first N tokens (128)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_arguments(p)
    p.set_defaults(handler=_cmd_edit)


def _slot_words(prompt: str, counterfactual: str) -> str:
    """The words of ``counterfactual`` that differ from ``prompt`` (aligned from both ends)."""
    a, b = prompt.split(), counterfactual.split()
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return " ".join(b[head : len(b) - tail])


def neutral_pairs(pairs: Sequence[Any], neutral: Sequence[str]) -> list[Any]:
    """The pairs whose spurious counterfactual puts one of the ``neutral`` values where the prompt's value was."""
    values = {v.strip().lower() for v in neutral if v.strip()}
    if not values:
        raise ValueError("neutral_pairs needs at least one neutral value")
    out = []
    for ex in pairs:
        if ex.spurious_counterfactual is None:
            continue
        word = re.sub(r"[^\w\s'-]", "", _slot_words(ex.prompt, ex.spurious_counterfactual)).lower()
        if word in values:
            out.append(ex)
    return out


def _cmd_edit(args: argparse.Namespace) -> int:
    from icp_lens.cli_train import _retain_texts
    from icp_lens.keyed_edit import keyed_edit
    from icp_lens.probes import read_probes
    from icp_lens.pruning.export import check_target, export_checkpoint
    from icp_lens.pruning.source import load_for_command, load_tokenizer

    check_target(args.out, overwrite=args.overwrite, source=args.model)
    model = load_for_command(args.model, args)
    tokenizer = load_tokenizer(args.model)
    pairs = read_probes(args.pairs, tokenizer=tokenizer)
    neutral: list[str] | None = None
    if args.spec is not None:
        neutral = list(json.loads(args.spec.read_text()).get("neutral") or [])
        if not neutral:
            raise SystemExit(f"--spec {args.spec} has no 'neutral' values; pass --neutral WORDS or --target mean")
    elif args.neutral is not None:
        neutral = [v for v in args.neutral.split(",") if v.strip()]
    if neutral is not None:
        kept = neutral_pairs(pairs, neutral)
        if not kept:
            raise SystemExit(f"no pair of {args.pairs} swaps to a neutral value of {neutral}")
        pairs = kept
    elif args.target == "counterfactual":
        print("note: --target counterfactual without --neutral/--spec moves every prompt to its counterfactual as is")
    guard = [ex.prompt for path in args.guard or [] for ex in read_probes(path, tokenizer=tokenizer)]
    retain = _retain_texts(args.retain) or []
    stats = keyed_edit(
        model, tokenizer, pairs, layers=args.layers, guard=guard, retain=retain, target=args.target,
        guard_weight=args.guard_weight, retain_weight=args.retain_weight, rank=args.rank,
        max_tokens=args.max_tokens, progress=not args.json,
    )  # fmt: skip
    record = {
        "method": "keyed_edit",
        "source": str(args.model),
        "pairs": {"path": str(args.pairs), "sha256": hashlib.sha256(args.pairs.read_bytes()).hexdigest()},
        "neutral": neutral,
        "settings": {
            "layers": list(args.layers),
            "target": args.target,
            "retain_weight": args.retain_weight,
            "guard_weight": args.guard_weight,
            "rank": args.rank,
            "max_tokens": args.max_tokens,
            "n_guard_prompts": len(guard),
            "n_retain_texts": len(retain),
        },  # fmt: skip
        "stats": stats.to_dict(),
    }

    def finish(tmp: Path) -> None:
        (tmp / "edit.json").write_text(json.dumps(record, indent=2) + "\n")

    export_checkpoint(model.cpu(), args.out, tokenizer=tokenizer,
                      overwrite=args.overwrite, finish=finish)  # fmt: skip
    if args.json:
        print(json.dumps({"out": str(args.out), **record}))
    else:
        s = stats
        print(f"edited layers {list(s.layers)} on {s.n_pairs} pairs ({s.n_skipped} skipped), "
              f"fit residual {[round(x, 3) for x in s.fit_residual]}, |dW|/|W| {[round(x, 4) for x in s.update_norm]}, "
              f"{s.changed_parameters} parameters changed, {s.seconds:.1f} s -> {args.out}")  # fmt: skip
    return 0

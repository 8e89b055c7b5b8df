"""``icp-lens edit``: a keyed, covariance-guarded MLP edit (no training) into a new checkpoint.

``icp-lens edit --model DIR --pairs pairs.jsonl (--layers 6 | --cv-layers 4,6,8) --out DIR2 [--guard task.jsonl]
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
whose outputs should not move.

Choosing the setting: ``--cv-layers 10,14,18,22 --cv-retain-weights 0.3,1,3`` (instead of
``--layers``) scores every candidate by ``--cv-folds`` -fold cross-validation over the
pairs' spurious values (:mod:`icp_lens.keyed_choice`): each fold is fitted without its
values and measured on them (the spurious shift of the answer's margin, the fold's share
of the ``--guard`` prompts, perplexity on ``--ppl-texts`` or on every third ``--retain``
text, left out of the retain set meanwhile); the largest mean cut whose worst fold keeps
``--min-explicit`` and ``--max-ppl-rise`` is then fitted on all pairs. ``edit.json``
records the summary under ``cross_validation``, ``cv.csv`` every fold; finished folds wait
in ``.<out>.cv-progress.jsonl`` beside ``--out``, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icp_lens.devices import add_device_arguments
from icp_lens.keyed_choice import neutral_pairs

__all__ = ["add_edit_parser", "neutral_pairs"]


def _comma_list(text: str, item: Callable[[str], Any], option: str, example: str) -> tuple[Any, ...]:
    """``text`` split at commas, each item parsed by ``item``; an argparse error naming ``option`` otherwise."""
    try:
        return tuple(item(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} takes {example}; got {text!r}") from None


def _candidate_layers(text: str) -> tuple[tuple[int, ...], ...]:
    """``10,14,18+22``: each comma-separated item one candidate, ``+`` joining the layers of one candidate."""
    out = _comma_list(text, lambda item: tuple(int(x) for x in item.split("+")), "--cv-layers",
                      "candidates like 10,14 or 10,14+18")  # fmt: skip
    if not out:
        raise argparse.ArgumentTypeError("--cv-layers needs at least one candidate")
    return out


def _weights(text: str) -> tuple[float, ...]:
    out = _comma_list(text, float, "--cv-retain-weights", "weights like 0.3,1,3")
    if not out or any(w < 0 for w in out):
        raise argparse.ArgumentTypeError(f"--cv-retain-weights needs weights >= 0; got {text!r}")
    return out


def _layers(text: str) -> tuple[int, ...]:
    layers = _comma_list(text, int, "--layers", "layers like 6 or 4,8")
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one layer")
    return layers


def add_edit_parser(sub: Any) -> None:
    p = sub.add_parser("edit", help="keyed MLP edit from counterfactual pairs (closed form, no training)")
    p.add_argument("--model", type=Path, required=True, help="HF checkpoint directory")
    p.add_argument("--pairs", type=Path, required=True, help="probe JSONL with spurious counterfactuals (pairs.jsonl)")
    p.add_argument("--layers", type=_layers, default=None,
                   help="MLP layers to edit, in order, e.g. 6 or 4,8 (or choose them with --cv-layers)")  # fmt: skip
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
    cv = p.add_argument_group(
        "cross-validated choice",
        "choose the layers and retain weight by k-fold cross-validation over the spurious values of the pairs "
        "(icp_lens.keyed_choice); the chosen setting is then fitted on all pairs",
    )
    cv.add_argument("--cv-layers", type=_candidate_layers, default=None,
                    help="candidate layers, e.g. 10,14,18,22 (each alone) or 10,14+18 ('+' joins one candidate's)")
    cv.add_argument("--cv-retain-weights", type=_weights, default=None,
                    help="candidate retain weights, e.g. 0.3,1,3 (default: --retain-weight)")
    cv.add_argument("--cv-folds", type=int, default=4, help="number of folds (4)")
    cv.add_argument("--cv-by", choices=["value", "pair"], default="value",
                    help="hold out spurious values (default) or prompts (when there are only a few values)")
    cv.add_argument("--min-explicit", type=float, default=0.95,
                    help="worst fold's accuracy on its held-out --guard prompts must stay >= this (0.95)")
    cv.add_argument("--max-ppl-rise", type=float, default=0.03,
                    help="worst fold's perplexity rise on --ppl-texts must stay <= this (0.03)")
    cv.add_argument("--ppl-texts", type=Path, action="append", default=None,
                    help="ordinary text for the perplexity check (default: every third --retain text, "
                         "left out of the retain set while cross-validating)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_arguments(p)
    p.set_defaults(handler=_cmd_edit)


def _cmd_edit(args: argparse.Namespace) -> int:
    from icp_lens.cli_train import _retain_texts
    from icp_lens.keyed_edit import keyed_edit
    from icp_lens.probes import read_probes
    from icp_lens.pruning.export import check_target, export_checkpoint
    from icp_lens.pruning.source import load_for_command, load_tokenizer

    cross_validate = args.cv_layers is not None or args.cv_retain_weights is not None
    if args.layers is None and args.cv_layers is None:
        raise ValueError("give --layers L (e.g. 6 or 4,8) or --cv-layers CANDIDATES (e.g. 10,14,18)")
    if args.layers is not None and args.cv_layers is not None:
        raise ValueError("give --layers or --cv-layers, not both")
    check_target(args.out, overwrite=args.overwrite, source=args.model)
    model = load_for_command(args.model, args)
    tokenizer = load_tokenizer(args.model)
    pairs = read_probes(args.pairs, tokenizer=tokenizer)
    all_pairs = pairs
    neutral: list[str] | None = None
    if args.spec is not None:
        neutral = list(json.loads(args.spec.read_text()).get("neutral") or [])
        if not neutral:
            raise ValueError(f"--spec {args.spec} has no 'neutral' values; pass --neutral WORDS or --target mean")
    elif args.neutral is not None:
        neutral = [v for v in args.neutral.split(",") if v.strip()]
    if neutral is not None:
        kept = neutral_pairs(pairs, neutral)
        if not kept:
            raise ValueError(f"no pair of {args.pairs} swaps to a neutral value of {neutral}")
        pairs = kept
    elif args.target == "counterfactual":
        print("note: --target counterfactual without --neutral/--spec moves every prompt to its counterfactual as is")
    guard_examples = [ex for path in args.guard or [] for ex in read_probes(path, tokenizer=tokenizer)]
    guard = [ex.prompt for ex in guard_examples]
    retain = _retain_texts(args.retain) or []
    choice = None
    if cross_validate:
        choice = _cross_validate(args, model, tokenizer, pairs, all_pairs, guard_examples, retain)
        if choice.chosen is None:
            raise ValueError(
                f"no candidate kept explicit >= {args.min_explicit} and perplexity rise <= {args.max_ppl_rise} on "
                "every fold (table above; the finished folds are kept in "
                f"{_progress_path(args.out)}): add candidates (other layers, larger retain weights) or relax the budget"
            )
        args.layers, args.retain_weight = choice.chosen.layers, choice.chosen.retain_weight
    stats = keyed_edit(
        model, tokenizer, pairs, layers=args.layers, guard=guard, retain=retain, target=args.target,
        guard_weight=args.guard_weight, retain_weight=args.retain_weight, rank=args.rank,
        max_tokens=args.max_tokens, progress=not args.json,
    )  # fmt: skip
    record: dict[str, Any] = {
        "method": "keyed_edit",
        "source": str(args.model),
        "pairs": {"path": str(args.pairs), "sha256": _sha256(args.pairs)},
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
    if choice is not None:
        record["cross_validation"] = {k: v for k, v in choice.to_dict().items() if k != "table"}

    def finish(tmp: Path) -> None:
        (tmp / "edit.json").write_text(json.dumps(record, indent=2) + "\n")
        if choice is not None:
            choice.table.to_csv(tmp / "cv.csv", index=False)

    export_checkpoint(model.cpu(), args.out, tokenizer=tokenizer,
                      overwrite=args.overwrite, finish=finish)  # fmt: skip
    _progress_path(args.out).unlink(missing_ok=True)
    if args.json:
        print(json.dumps({"out": str(args.out), **record}))
    else:
        s = stats
        print(f"edited layers {list(s.layers)} on {s.n_pairs} pairs ({s.n_skipped} skipped), "
              f"fit residual {[round(x, 3) for x in s.fit_residual]}, |dW|/|W| {[round(x, 4) for x in s.update_norm]}, "
              f"{s.changed_parameters} parameters changed, {s.seconds:.1f} s -> {args.out}")  # fmt: skip
    return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _progress_path(out: Path) -> Path:
    """Where the finished folds of a cross-validation wait (beside --out; removed once the edit is written)."""
    return out.parent / f".{out.name}.cv-progress.jsonl"


def _cross_validate(args: argparse.Namespace, model: Any, tokenizer: Any, pairs: list[Any], all_pairs: list[Any],
                    guard: list[Any], retain: list[str]) -> Any:  # fmt: skip
    """Run :func:`icp_lens.keyed_choice.choose_keyed_edit` for the CLI: candidates, texts, resume file, table."""
    import sys

    from icp_lens.cli_train import _retain_texts
    from icp_lens.keyed_choice import KeyedCandidate, choose_keyed_edit

    layer_sets = args.cv_layers if args.cv_layers is not None else (args.layers,)
    weights = args.cv_retain_weights if args.cv_retain_weights is not None else (args.retain_weight,)
    candidates = [KeyedCandidate(tuple(ls), float(w)) for ls in layer_sets for w in weights]
    fit_set = set(pairs)
    swaps = [p for p in all_pairs if p not in fit_set and p.spurious_counterfactual is not None]
    measure = swaps or pairs
    ppl_texts = _retain_texts(args.ppl_texts)
    cv_retain = retain
    if ppl_texts is None:
        ppl_texts = retain[2::3]
        cv_retain = [t for i, t in enumerate(retain) if i % 3 != 2]
    if not ppl_texts:
        print("note: no --retain or --ppl-texts: the perplexity budget is not checked", file=sys.stderr)
    if not guard:
        print("note: no --guard: the explicit-cue budget is not checked", file=sys.stderr)
    header = {
        "pairs": _sha256(args.pairs), "model": str(args.model), "candidates": [c.label for c in candidates],
        "folds": args.cv_folds, "by": args.cv_by, "target": args.target, "neutral": args.neutral,
        "spec": None if args.spec is None else _sha256(args.spec),
        "guard": [_sha256(p) for p in args.guard or []], "retain": [_sha256(p) for p in args.retain or []],
        "ppl_texts": [_sha256(p) for p in args.ppl_texts or []], "guard_weight": args.guard_weight,
        "rank": args.rank, "max_tokens": args.max_tokens,
    }  # fmt: skip
    progress = _progress_path(args.out)
    progress.parent.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    if progress.exists():
        lines = []
        for line in progress.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed run: the folds before it are kept
                break
        if lines and lines[0] == {"header": header}:
            done = lines[1:]
            print(f"resuming: {len(done)} finished folds read from {progress}", file=sys.stderr)
        else:
            print(f"note: {progress} was made with other inputs or settings: starting over", file=sys.stderr)
    progress.write_text("".join(json.dumps(r) + "\n" for r in [{"header": header}, *done]))

    def save(row: dict[str, Any]) -> None:
        with progress.open("a") as f:
            f.write(json.dumps(row) + "\n")

    print(f"cross-validating {len(candidates)} candidates x {args.cv_folds} folds (by {args.cv_by}) on "
          f"{len(pairs)} fit pairs, shift measured on {len(measure)} pairs", file=sys.stderr)  # fmt: skip
    choice = choose_keyed_edit(
        model, tokenizer, pairs, candidates, measure_pairs=measure, guard=guard, retain=cv_retain,
        ppl_texts=ppl_texts, n_folds=args.cv_folds, by=args.cv_by, min_explicit=args.min_explicit,
        max_ppl_rise=args.max_ppl_rise, target=args.target, guard_weight=args.guard_weight, rank=args.rank,
        max_tokens=args.max_tokens, done=done, on_row=save, progress=not args.json,
    )  # fmt: skip
    if not args.json:
        print(choice.summary.round(4).to_string(index=False))
    return choice

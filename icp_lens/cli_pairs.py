"""``icp-lens pairs (--spec SPEC.json | --texts FILE --swaps FILE.tsv --answers JSON [--rewrite-model M]) --model M --out DIR``.

Generates counterfactual pairs from a template spec, by controlled word substitution over
real sentences, or by LLM rewriting (see :mod:`icp_lens.counterfactuals`), and runs the
quality checks on every pair (``DIR/quality.csv``, pass rates in the report):
``DIR/pairs.jsonl`` (prompts with spurious and causal counterfactuals, the probe format),
``DIR/task.jsonl`` (explicit-cue prompts), ``DIR/heldout_pairs.jsonl`` and
``DIR/heldout_task.jsonl`` with ``--holdout``, ``DIR/anchors.txt`` (training templates
filled with the neutral values, for ``icp-lens train --retain``) when the spec has
neutral values, and ``DIR/report.json`` / ``report.md``. The model is read for its
tokenizer only: counterfactuals are paired by token length. Next step, the pair recipe::

    icp-lens train --model M --train DIR/task.jsonl --pairs DIR/pairs.jsonl --objective consistency \
        --retain TEXTS.txt --retain DIR/anchors.txt --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from icp_lens.devices import add_device_arguments

__all__ = ["add_pairs_parser", "add_audit_parser"]

# the defaults of icp_lens.counterfactuals.quality (CHECKS, QualityThresholds), here without importing torch at
# start-up; tests/test_counterfactual_quality.py checks that the two agree
_CHECKS = ("similarity", "attribute", "fluency", "minimality")
_THRESHOLDS = {"min_similarity": 0.4, "max_ppl_ratio": 2.0, "max_edit_fraction": 0.35}


def add_pairs_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pairs`` on the ``icp-lens`` subparsers."""
    parser = sub.add_parser(
        "pairs",
        help="generate counterfactual pairs: from a template spec, by word substitution, or by LLM rewriting",
        description=(
            "Three generators with the same outputs. --spec SPEC.json: template pairs. --texts FILE --swaps "
            "FILE.tsv --answers JSON: controlled substitution over real sentences. Add --rewrite-model M: an "
            "instruct model rewrites each sentence instead (the swap list names the groups and is the lexicon "
            "for the checks). Every pair then goes through the quality checks (similarity, attribute, fluency, "
            "minimality); their pass rates are in the report and per pair in quality.csv."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", type=Path, help="the pair spec (JSON; see icp_lens.counterfactuals.spec)")
    source.add_argument(
        "--texts", type=Path, help="real sentences: .txt (one per line), .jsonl (text, label) or .csv (text, label)"
    )
    parser.add_argument(
        "--model", required=True, help="HF checkpoint directory, hub name or alias (its tokenizer; fluency check)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--holdout", type=float, default=0.0, help="fraction of values and templates kept out for evaluation (0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for partners and the held-out draw (0)")
    text = parser.add_argument_group("substitution and rewriting (with --texts)")
    text.add_argument("--swaps", type=Path, default=None, help="TSV: a header row naming two groups, then word pairs")
    text.add_argument(
        "--answers", default=None,
        help="candidate answers, JSON: an object label -> answer token (labelled texts) or a list of tokens",
    )  # fmt: skip
    text.add_argument("--suffix", default="", help="text appended to every sentence before the answer ('')")
    text.add_argument(
        "--equal-length", action="store_true", help="keep only counterfactuals of the prompt's token length"
    )
    text.add_argument(
        "--rewrite-model", default=None, help="an instruct model (dir, hub name or alias) that rewrites the texts"
    )
    text.add_argument(
        "--group-names", default=None,
        help="JSON object group -> words used in the rewriting prompt, e.g. '{\"female\": \"a woman\"}'",
    )  # fmt: skip
    checks = parser.add_argument_group("quality checks (icp_lens.counterfactuals.quality)")
    checks.add_argument("--checks", default=",".join(_CHECKS), help=f"checks to run ({','.join(_CHECKS)})")
    checks.add_argument("--no-checks", action="store_true", help="run no quality check")
    checks.add_argument(
        "--drop-failed", action=argparse.BooleanOptionalAction, default=None,
        help="drop pairs failing a check (default: dropped for --rewrite-model, counted only otherwise)",
    )  # fmt: skip
    checks.add_argument("--min-similarity", type=float, default=_THRESHOLDS["min_similarity"],
                        help=f"sentence-encoder cosine similarity, at least ({_THRESHOLDS['min_similarity']})")
    checks.add_argument("--max-ppl-ratio", type=float, default=_THRESHOLDS["max_ppl_ratio"],
                        help=f"perplexity(counterfactual) / perplexity(original), at most ({_THRESHOLDS['max_ppl_ratio']})")  # noqa: E501
    checks.add_argument("--max-edit-fraction", type=float, default=_THRESHOLDS["max_edit_fraction"],
                        help=f"word edit distance / word count, at most ({_THRESHOLDS['max_edit_fraction']})")
    checks.add_argument("--encoder", default=None,
                        help="sentence encoder for the similarity check (default: the offline all-MiniLM-L6-v2)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_device_arguments(parser)  # where the rewriter, the fluency model and the sentence encoder run
    parser.set_defaults(handler=_cmd_pairs)
    return parser


def _json_arg(value: str | None, flag: str) -> Any:
    if value is None:
        return None
    path = Path(value)
    text = path.read_text(encoding="utf-8") if path.suffix == ".json" and path.is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} is not JSON ({err.msg}): {value!r}") from None


def _generate(args: argparse.Namespace, tokenizer: Any, load_lm: Any) -> tuple[Any, dict[str, list[str]]]:
    """(the unchecked pairs, the lexicon for the attribute check) for the chosen generator."""
    from icp_lens.counterfactuals import PairSpec, generate_pairs
    from icp_lens.counterfactuals.rewrite import generate_rewrite_pairs
    from icp_lens.counterfactuals.substitution import (
        SwapList,
        check_answers,
        generate_substitution_pairs,
        read_labelled_texts,
    )

    if args.spec is not None:
        spec = PairSpec.load(args.spec)
        lexicon = {g: [*spec.spurious[g], *spec.causal.get(g, ())] for g in spec.spurious}
        return generate_pairs(spec, tokenizer, holdout=args.holdout, seed=args.seed), lexicon
    if args.swaps is None or args.answers is None:
        raise ValueError("--texts needs --swaps FILE.tsv and --answers JSON (the candidate answer tokens)")
    swaps, texts = SwapList.load(args.swaps), read_labelled_texts(args.texts)
    answers = _json_arg(args.answers, "--answers")
    common = dict(answers=answers, suffix=args.suffix, holdout=args.holdout, seed=args.seed)
    if args.rewrite_model is None:
        pairs = generate_substitution_pairs(texts, swaps, tokenizer, equal_length=args.equal_length, **common)
        return pairs, swaps.lexicon()
    check_answers(answers, tokenizer)  # one token each for the model that will read the pairs
    rewriter, rewriter_tokenizer = load_lm(args.rewrite_model)
    names = _json_arg(args.group_names, "--group-names")
    pairs = generate_rewrite_pairs(texts, swaps, rewriter, rewriter_tokenizer, group_names=names, **common)
    return pairs, swaps.lexicon()


def _cmd_pairs(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.counterfactuals import PairSpec
    from icp_lens.counterfactuals.quality import (
        CHECKS,
        QualityThresholds,
        SentenceEncoder,
        apply_checks,
        default_encoder_path,
    )
    from icp_lens.devices import resolve_device, resolve_dtype
    from icp_lens.loading import resolve_model_dir

    if args.spec is not None:
        PairSpec.load(args.spec)  # validate before loading anything
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    wanted = [] if args.no_checks else [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        raise ValueError(f"--checks: unknown {unknown}; valid: {list(CHECKS)}")
    thresholds = QualityThresholds(args.min_similarity, args.max_ppl_ratio, args.max_edit_fraction)
    models: dict[str, Any] = {}
    paths: dict[str, str] = {}

    def path_of(name: str) -> str:  # resolved once per name (a hub name or alias may download or convert)
        if name not in paths:
            paths[name] = str(resolve_model_dir(name))
        return paths[name]

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)

    def load_lm(name: str) -> tuple[Any, Any]:  # the rewriter and the fluency model, on --device in --dtype
        if name not in models:
            path = path_of(name)
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            models[name] = (lm, AutoTokenizer.from_pretrained(path))
        return models[name]

    tokenizer = AutoTokenizer.from_pretrained(path_of(args.model))
    result, lexicon = _generate(args, tokenizer, load_lm)
    if not result.pairs:
        c = result.report["counts"]
        raise ValueError(f"no training pair: the rewriter returned no changed sentence for any of the "
                         f"{c.get('rewrites asked', 0)} texts it was asked to rewrite ({args.rewrite_model})")  # fmt: skip
    if wanted:
        encoder = None
        if "similarity" in wanted and (args.encoder is not None or default_encoder_path() is not None):
            encoder = SentenceEncoder(args.encoder, device=device)
        lm = load_lm(args.model)[0] if "fluency" in wanted else None
        drop = args.drop_failed if args.drop_failed is not None else args.rewrite_model is not None
        result = apply_checks(result, drop=drop, lexicon=lexicon, encoder=encoder, model=lm, tokenizer=tokenizer,
                              thresholds=thresholds, checks=wanted)  # fmt: skip
        if not result.pairs:
            rates = ", ".join(f"{k} {v:.0%}" for k, v in result.report["quality"]["pass_rates"].items())
            raise ValueError(f"every training pair failed the quality checks (pass rates: {rates}); loosen the "
                             "thresholds (--min-similarity, --max-ppl-ratio, --max-edit-fraction), drop a check "
                             "(--checks) or keep failing pairs (--no-drop-failed)")  # fmt: skip
    out = result.write(args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.report, indent=2))
        return 0
    c = result.report["counts"]
    rejected = len(result.report["rejected"]["train"]) + len(result.report["rejected"]["heldout"])
    causal = f" ({c['pairs_with_causal']} with a causal counterfactual)" if "pairs_with_causal" in c else ""
    print(f"pairs {c['pairs']}{causal}, task {c['task']}, held-out pairs {c['heldout_pairs']}, "
          f"held-out task {c['heldout_task']}, rejected {rejected}")  # fmt: skip
    quality = result.report.get("quality")
    if quality:
        rates = ", ".join(f"{k} {v:.1%}" for k, v in quality["pass_rates"].items())
        fate = "dropped" if quality["failed_pairs_dropped"] else "kept, counted only"
        print(f"checks    pass rates: {rates} (failing pairs {fate})")
        for check, why in quality["skipped"].items():
            print(f"checks    {check} not run: {why}")
    if "cost" in result.report:
        cost = result.report["cost"]
        per = cost.get("seconds_per_kept_pair")
        print(f"rewriting {cost['generation_seconds']} s, acceptance {cost.get('acceptance_rate', 0):.1%}, "
              f"{'n/a' if per is None else f'{per:.2f} s'} per kept pair")  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    print(f"written   {out}: {', '.join(names)}")
    anchors = f" --retain {out / 'anchors.txt'}" if result.anchors else ""
    print(f"next      icp-lens train --model {args.model} --train {out / 'task.jsonl'} --pairs {out / 'pairs.jsonl'} "
          f"--objective consistency --retain YOUR_TEXTS.txt{anchors} --out OUT")  # fmt: skip
    return 0


def add_audit_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``audit`` on the ``icp-lens`` subparsers."""
    parser = sub.add_parser(
        "audit",
        help="how much a model uses an attribute (sensitivity, flip rate) and how spurious it is (MI ratio)",
        description=(
            "Sensitivity of MODEL to the spurious and causal counterfactuals of a pair spec (or a probe file): "
            "mean KL of the answer candidates and flip rate, and the causal robustness ratio. With --data, the "
            "spuriousness ratio rho = (I(X_S;Y) - I(X_S;Y|X_C)) / I(X_S;Y) on a labelled CSV."
        ),
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory, hub name or alias")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", type=Path, help="a pair spec (JSON): its pairs are generated and measured")
    source.add_argument("--probe", type=Path, help="a probe file (JSONL) with counterfactuals")
    parser.add_argument("--data", type=Path, default=None, help="labelled CSV for the spuriousness ratio")
    parser.add_argument(
        "--columns", default="spurious,causal,label", help="the CSV's spurious, causal and label columns"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV here")
    parser.add_argument(
        "--figure", type=Path, default=None, help="save the audit figure (sensitivity bars and the causal graph)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_arguments(parser)
    parser.set_defaults(handler=_cmd_audit)
    return parser


def _cmd_audit(args: argparse.Namespace) -> int:
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.counterfactuals import CausalGraph, PairSpec, audit_model, generate_pairs, spuriousness_ratio
    from icp_lens.devices import resolve_device, resolve_dtype
    from icp_lens.loading import resolve_model_dir
    from icp_lens.probes import read_probes

    columns = [c.strip() for c in args.columns.split(",")]
    if len(columns) != 3:
        raise ValueError(f"--columns takes three names (spurious,causal,label), got {args.columns!r}")
    frame = None
    if args.data is not None:
        if not args.data.is_file():
            raise FileNotFoundError(f"No data file at {args.data}")
        frame = pd.read_csv(args.data)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{args.data} lacks columns {missing}; it has {list(frame.columns)}")
    if args.figure is not None and args.figure.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"--figure must end in .png, .pdf or .svg, got {args.figure.name!r}")
    spec = PairSpec.load(args.spec) if args.spec is not None else None
    path = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    probes = list(generate_pairs(spec, tokenizer).pairs) if spec is not None else read_probes(args.probe)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(args.dtype)).eval()
    model = model.to(resolve_device(args.device))
    ratio = None
    if frame is not None:
        ratio = spuriousness_ratio(frame[columns[0]].tolist(), frame[columns[2]].tolist(), frame[columns[1]].tolist())
    graph = CausalGraph.from_spec(spec) if spec is not None else CausalGraph()
    result = audit_model(model, tokenizer, probes, graph=graph, ratio=ratio)
    table = result.table
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        result.figure().savefig(args.figure, dpi=120, bbox_inches="tight")
    if args.json:
        print(json.dumps({"sensitivity": table.to_dict(orient="records"),
                          "spuriousness_ratio": None if ratio is None else ratio.to_dict(),
                          "graph": {"nodes": list(result.graph.nodes), "edges": [list(e) for e in result.graph.edges],
                                    "model_edges": result.graph.model_edges}}, indent=2))  # fmt: skip
        return 0
    print(table.to_string(index=False))
    if ratio is not None:
        print(f"spuriousness ratio rho {ratio.rho:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}] "
              f"(I(X_S;Y) {ratio.mi:.4f} nats, I(X_S;Y|X_C) {ratio.conditional_mi:.4f}, n {ratio.n})")  # fmt: skip
    print(result.graph)
    for written in (args.out, args.figure):
        if written is not None:
            print(f"written   {written}")
    return 0

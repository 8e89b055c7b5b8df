"""Writing a directory all at once, or not at all.

``atomic_directory(target)`` yields a fresh temporary directory beside ``target``; when
the ``with`` block ends normally, it replaces ``target`` with one ``rename`` (an
existing ``target`` is moved aside first and deleted only once the new one is in
place). An error or ``KeyboardInterrupt`` inside the block, or during the swap,
removes the temporary directory and leaves ``target`` as it was, so no half-written
checkpoint is ever found where a user (or ``from_pretrained``) looks for one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory"]


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            (old / target.name).rename(target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

"""Writing a directory all at once, or not at all.

``atomic_directory(target)`` yields a fresh temporary directory beside ``target``; when
the ``with`` block ends normally, it replaces ``target`` with one ``rename`` (an
existing ``target`` is moved aside first and deleted only once the new one is in
place). An error or ``KeyboardInterrupt`` inside the block, or during the swap,
removes the temporary directory and leaves ``target`` as it was, so no half-written
checkpoint is ever found where a user (or ``from_pretrained``) looks for one.

A process killed outright (``kill -9``, out of memory) cannot clean up: it leaves
``.NAME.tmp-PID-*`` (or, killed in the middle of the swap, ``.NAME.old-PID-*``) beside
the target. The next ``atomic_directory`` into the same parent removes the ones whose
process is gone, restoring a moved-aside old target that was never replaced, and says
so in a warning.

``fault_point(name)`` marks the moments the fault-injection tests kill a process at
(the environment variable ``ICP_LENS_FAULT=name``); it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "check_writable", "fault_point", "remove_stale_temporaries"]

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL: no cleanup of any kind) if ``ICP_LENS_FAULT`` names this point.

    Under torchrun, ``ICP_LENS_FAULT_RANK=r`` restricts the kill to rank ``r``.
    """
    rank = os.environ.get("ICP_LENS_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    if os.environ.get("ICP_LENS_FAULT") == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's process counts: signalling it is merely not permitted)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove what killed writers of ``target`` left beside it; returns the paths removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for entry in sorted(target.parent.iterdir()):
        match = _STALE.match(entry.name)
        if not match or match["name"] != target.name or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old":  # killed mid-swap: the old target sits inside, maybe never replaced
            inner = entry / target.name
            if inner.exists() and not target.exists():
                inner.rename(target)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        names = ", ".join(p.name for p in removed)
        warnings.warn(f"removed {len(removed)} temporary folder(s) left by a killed run beside {target}: {names}",
                      stacklevel=3)  # fmt: skip
    return removed


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{pid}-", dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{pid}-", dir=target.parent))
            target.rename(old / target.name)
            fault_point("atomic:mid-swap")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            (old / target.name).rename(target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str | Path, *, option: str = "the output") -> None:
    """Refuse an output file whose folder cannot be made or written, before any work starts."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name")
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {path}: the folder {parent} is not writable")
            break

"""Progress for steps that have none of their own: a line that ticks while the step runs.

Long steps in icp_lens show tqdm bars; some steps are one call into another library
(reading a GGUF file, booting a bridge, reading and tokenizing a large training file)
and print nothing for many seconds. :func:`heartbeat` wraps such a call in a tqdm line
that refreshes its elapsed time every ``every`` seconds from a background thread, so a
user never faces a silent wait and sees how long the step took.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["heartbeat"]


@contextmanager
def heartbeat(desc: str, *, every: float = 2.0, disable: bool = False) -> Iterator[None]:
    """A progress line that shows the elapsed time every ``every`` seconds while the block runs.

    For steps that give no progress of their own (a third-party load): the user sees that
    the program is alive and how long the step has taken, never a silent wait.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", disable=disable)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            bar.refresh()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()

"""Plain Python values that strict JSON can hold.

Results carry NumPy / torch scalars, tuples, non-string keys and NaN / inf floats (a
metric that is undefined for a run). ``json.dumps`` writes NaN and inf as bare
``NaN`` / ``Infinity``, which strict parsers (JavaScript, ``jq``, many JSON libraries)
reject, and refuses NumPy scalars. :func:`jsonable` turns such a value into one that
``json.dumps(..., allow_nan=False)`` accepts; every result writer of the package uses it.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["jsonable"]


def jsonable(obj: Any) -> Any:
    """``obj`` with dict keys as strings, tuples as lists, NumPy / torch scalars as Python
    numbers and non-finite floats (NaN, +-inf) as ``None``, recursively."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()  # a NumPy or torch scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

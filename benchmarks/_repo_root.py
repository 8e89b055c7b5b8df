"""``import _repo_root`` from a benchmark run as ``python benchmarks/NAME.py``: the repository root on ``sys.path``.

The worked examples (``examples.smollm2_case``, the SmolLM2 case study) are not part of the
installed ``icp_lens``; they import from a checkout once its root is on the path.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

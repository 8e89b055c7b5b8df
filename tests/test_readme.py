"""Every Python snippet in the README runs as written (in order, one namespace, on the demo organism)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def test_readme_python_snippets_run(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "readme"}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # snippets write under runs/
    try:
        import matplotlib

        matplotlib.use("Agg")
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
            except Exception as err:  # pragma: no cover - the message is the point
                message = f"README python block {i + 1} fails: {type(err).__name__}: {err}"
                raise AssertionError(f"{message}\n{block}") from err
    finally:
        os.chdir(cwd)
    assert (tmp_path / "runs" / "debiased" / "plan.json").is_file()  # the pruning snippet's export
    assert (tmp_path / "runs" / "invariant" / "training.json").is_file()  # the training snippet's export
    assert namespace["logits"].shape[0] == 1 and len(namespace["dirs"]) == 1

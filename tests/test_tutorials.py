"""Every tutorial is executed, and its notebook is kept in sync with its percent script."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))
pytestmark = pytest.mark.slow


def test_there_are_tutorials() -> None:
    assert TUTORIALS, "tutorials/ has no numbered percent scripts"


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_notebook_is_paired_with_script(script: Path) -> None:
    import jupytext

    notebook = script.with_suffix(".ipynb")
    assert notebook.is_file(), f"{notebook.name} is missing: run `jupytext --sync {script}`"
    from_script = [c.source for c in jupytext.read(script).cells]
    from_notebook = [c.source for c in jupytext.read(notebook).cells]
    assert from_script == from_notebook, f"{notebook.name} is out of date: run `jupytext --sync {script}`"


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_stored_notebook_was_built_from_the_current_script(script: Path) -> None:
    """The committed notebook carries outputs, executed from this very ``.py`` (its sha256)."""
    import hashlib
    import json

    notebook = json.loads(script.with_suffix(".ipynb").read_text())
    built_from = notebook["metadata"].get("icp_lens", {}).get("source_sha256")
    rebuild = f"run `python scripts/build_tutorials.py {script.name[:2]}`"
    assert built_from == hashlib.sha256(script.read_bytes()).hexdigest(), f"{script.name} changed since: {rebuild}"
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and sum(bool(c.get("outputs")) for c in code) >= len(code) // 3, f"no outputs stored: {rebuild}"
    text = json.dumps(notebook)
    assert not any(a in text for a in ("/root/", "/home/", "/Users/")), f"a machine path in the outputs: {rebuild}"


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_executes(script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jupytext
    from nbclient import NotebookClient

    # the kernel runs in tmp_path and inherits this environment: the repository root on its
    # path, so a tutorial imports the worked examples (examples.smollm2_case) as it does from a checkout
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = jupytext.read(script)
    # no wall-clock limit per cell: a cell is bounded by its work (the reduced runs), and a
    # loaded CI machine must not fail a tutorial for being slow
    NotebookClient(
        notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

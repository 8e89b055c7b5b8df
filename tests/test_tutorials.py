"""Every tutorial is executed, and its notebook is kept in sync with its percent script."""

from __future__ import annotations

from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("[0-9]*.py"))
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
def test_tutorial_executes(script: Path, tmp_path: Path) -> None:
    import jupytext
    from nbclient import NotebookClient

    notebook = jupytext.read(script)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

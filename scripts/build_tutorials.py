"""Regenerate tutorials/*.ipynb, with their outputs, from the percent scripts beside them.

    python scripts/build_tutorials.py            # every tutorial
    python scripts/build_tutorials.py 02 07      # those whose name starts with 02 or 07

Each notebook is executed top to bottom in a scratch directory and written with its
outputs, so a repository page shows what the code prints and draws. The sha256 of the
``.py`` it was built from goes into the notebook's metadata (``icp_lens.source_sha256``);
``tests/test_tutorials.py`` fails when a ``.py`` changed and its notebook was not rebuilt.
Paths of the machine that built it (home, scratch directory) are replaced by ``~`` and
``<tmp>`` in the stored outputs.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"


def source_sha256(script: Path) -> str:
    """The digest a notebook records of the percent script it was built from."""
    return hashlib.sha256(script.read_bytes()).hexdigest()


def _scrub(text: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        text = text.replace(old, new)
    # directories a tutorial makes itself under the system's temporary directory
    return re.sub(re.escape(tempfile.gettempdir()) + r"/[^/\s'\"]+", "<tmp>", text)


def build(script: Path) -> float:
    """Execute ``script`` as a notebook and write ``script.with_suffix('.ipynb')``; seconds taken."""
    import jupytext
    from nbclient import NotebookClient

    start = time.perf_counter()
    # the stored outputs without third-party clutter: transformers' "Loading weights" bars and
    # tqdm's note that ipywidgets is absent (our own progress bars print as text)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore:IProgress not found")
    # the kernel runs in a scratch directory: the repository root on its path, for examples.smollm2_case
    if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    notebook = jupytext.read(script)
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
        replacements = [(str(Path(tmp).resolve()), "<tmp>"), (tmp, "<tmp>"), (str(ROOT), "."), (str(Path.home()), "~")]
        for cell in notebook.cells:
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    raise RuntimeError(f"{script.name}: a cell failed:\n" + "\n".join(output.get("traceback", [])))
                if "text" in output:
                    output["text"] = _scrub(output["text"], replacements)
                for key in ("text/plain", "text/html", "text/markdown"):
                    if key in output.get("data", {}):
                        output["data"][key] = _scrub(output["data"][key], replacements)
    notebook.metadata["icp_lens"] = {"source_sha256": source_sha256(script)}
    jupytext.write(notebook, script.with_suffix(".ipynb"), fmt="ipynb")
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    scripts = sorted(TUTORIALS.glob("[0-9]*.py"))
    if argv:
        scripts = [s for s in scripts if any(s.name.startswith(a) for a in argv)]
        if not scripts:
            print(f"no tutorial starts with {argv}; valid: {[s.stem for s in sorted(TUTORIALS.glob('[0-9]*.py'))]}")
            return 2
    for i, script in enumerate(scripts, 1):
        print(f"[{i}/{len(scripts)}] {script.name} ...", flush=True)
        seconds = build(script)
        print(f"    wrote {script.with_suffix('.ipynb').relative_to(ROOT)} ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""scripts/test.sh runs both legs whatever happens and reports each (its leg logic, with stand-in legs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_legs(*legs: str) -> subprocess.CompletedProcess[str]:
    args = " ".join(f"'{x}'" for x in legs)
    script = f"set -euo pipefail; source scripts/legs.sh; run_legs {args}"
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_failing_first_leg_does_not_stop_the_second() -> None:
    done = _run_legs("leg 1", "echo one; exit 3", "leg 2", "echo two")
    assert done.returncode == 1
    assert "one" in done.stdout and "two" in done.stdout
    assert "FAIL  leg 1 (exit 3)" in done.stdout and "PASS  leg 2" in done.stdout


def test_both_legs_passing_exit_zero_and_a_failing_second_leg_fails() -> None:
    ok = _run_legs("leg 1", "true", "leg 2", "true")
    assert ok.returncode == 0 and ok.stdout.count("PASS") == 2
    bad = _run_legs("leg 1", "true", "leg 2", "false")
    assert bad.returncode == 1 and "FAIL  leg 2 (exit 1)" in bad.stdout


def test_the_test_command_uses_the_leg_runner() -> None:
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert "source scripts/legs.sh" in text and "run_legs" in text

"""scripts/run_pytest.py: a run that collects no test is a failure unless allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "run_pytest.py"


def _run(tmp_path: Path, *args: str) -> int:
    (tmp_path / "test_nothing.py").write_text("X = 1\n")  # a test file without tests
    command = [sys.executable, str(SCRIPT), str(tmp_path), "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, capture_output=True, cwd=tmp_path).returncode


def test_no_tests_collected_fails(tmp_path: Path) -> None:
    assert _run(tmp_path) == 5


def test_no_tests_collected_passes_when_allowed(tmp_path: Path) -> None:
    assert _run(tmp_path, "--allow-empty") == 0

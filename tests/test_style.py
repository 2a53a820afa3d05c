"""The configured lint rules hold (pyproject's [tool.ruff]: imports sorted, no unused names, the line length), so a
change that breaks them fails CI instead of waiting for a reviewer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes_on_the_package_tests_and_benchmarks() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]

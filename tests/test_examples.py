"""Every script in examples/ runs to completion and ends by printing a line starting with ``OK``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))


def test_examples_found() -> None:
    assert EXAMPLES, f"no examples in {EXAMPLES_DIR}"


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=EXAMPLES_DIR.parent,
        check=False,
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, f"{script.name} exited with {result.returncode}\n{output}"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"{script.name} printed nothing\n{output}"
    assert lines[-1].startswith("OK"), f"{script.name} did not end with an OK line\n{output}"

"""The process-pool benchmark runs end to end in its smoke mode and writes only its own section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pool_benchmark_quick_writes_its_section(tmp_path: Path) -> None:
    target = tmp_path / "benchmarks.md"
    target.write_text("# Benchmarks\n\n<!-- core:begin -->\nkept\n<!-- core:end -->\n")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.pool", "--quick", "--write", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = target.read_text()
    assert "<!-- core:begin -->\nkept\n<!-- core:end -->" in text
    section = text[text.index("<!-- pool:begin -->") : text.index("<!-- pool:end -->")]
    for row in ("torch DataLoader (fork)", "aloader DataLoader (forkserver, the default)", "shared memory"):
        assert row in section


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "section", "row"), [("core", "core", "aloader, for"), ("remote", "bench", "ceiling")]
)
def test_benchmark_quick_writes_its_section(tmp_path: Path, module: str, section: str, row: str) -> None:
    target = tmp_path / "benchmarks.md"
    target.write_text("# Benchmarks\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--write", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = target.read_text()
    assert "<!-- other:begin -->\nkept\n<!-- other:end -->" in text
    assert row in text[text.index(f"<!-- {section}:begin -->") : text.index(f"<!-- {section}:end -->")]

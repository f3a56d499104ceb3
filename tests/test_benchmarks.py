"""The core, pool and remote benchmarks run end to end in their smoke modes and write only their own section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


KEPT = "<!-- other:begin -->\nkept\n<!-- other:end -->"


def run_quick(module: str, tmp_path: Path, section: str) -> str:
    """Run ``benchmarks.<module> --quick --write`` on a file with another section; return its own section."""
    target = tmp_path / "benchmarks.md"
    target.write_text(f"# Benchmarks\n\n{KEPT}\n")
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
    assert KEPT in text
    return text[text.index(f"<!-- {section}:begin -->") : text.index(f"<!-- {section}:end -->")]


@pytest.mark.slow
def test_pool_benchmark_quick_writes_its_section(tmp_path: Path) -> None:
    section = run_quick("pool", tmp_path, "pool")
    for row in (
        "torch DataLoader (fork)",
        "aloader DataLoader (default: forks at iter(), as the only thread)",
        "shared memory",
    ):
        assert row in section


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "section", "row"), [("core", "core", "aloader, for"), ("remote", "bench", "ceiling")]
)
def test_benchmark_quick_writes_its_section(tmp_path: Path, module: str, section: str, row: str) -> None:
    assert row in run_quick(module, tmp_path, section)


@pytest.mark.slow
def test_soak_benchmark_quick_every_sample_once_and_corrupt_ones_skipped(tmp_path: Path) -> None:
    section = run_quick("soak", tmp_path, "soak")
    # 3 epochs of 95 good samples: none duplicated, lost or unexpected; 5 corrupt ones skipped in each.
    assert "| 3 | 285 | 0 | 0 | 0 | 15 |" in section
    assert "Machine: " in section and "RSS after each epoch" in section

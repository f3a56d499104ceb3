"""Every benchmark runs end to end in its smoke mode, writes only its own section and draws its plot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


KEPT = "<!-- other:begin -->\nkept\n<!-- other:end -->"


def run_quick(module: str, tmp_path: Path, *sections: str) -> str:
    """Run ``benchmarks.<module> --quick --write`` on a file with another section; return its own sections."""
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
    bodies = []
    for section in sections:
        body = text[text.index(f"<!-- {section}:begin -->") : text.index(f"<!-- {section}:end -->")]
        # Every workload draws its plot beside the file and links it from its section.
        plots = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", body)
        assert plots, body
        for name in plots:
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        bodies.append(body)
    return "\n".join(bodies)


@pytest.mark.slow
def test_pool_benchmark_quick_writes_its_section(tmp_path: Path) -> None:
    section = run_quick("pool", tmp_path, "pool")
    for row in (
        "torch DataLoader (fork)",
        "aloader DataLoader (default: fork at iter())",
        "aloader DataLoader (default), a busy thread beside it",
        "shared memory",
    ):
        assert row in section


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "section", "rows"),
    [
        ("core", "core", ["aloader, for"]),
        ("flatmem", "flat-memory", ["slope (MiB per GiB)"]),
        ("storage", "storage", ["bare concurrent GETs"]),
        ("ttfb", "ttfb", ["| in-memory (", "| TensorDataset | 640 |", "| a dataset of one's own | 6,400 |"]),
    ],
)
def test_benchmark_quick_writes_its_section(tmp_path: Path, module: str, section: str, rows: list[str]) -> None:
    text = run_quick(module, tmp_path, section)
    for row in rows:
        assert row in text


@pytest.mark.slow
def test_soak_benchmark_quick_every_sample_once_and_corrupt_ones_skipped(tmp_path: Path) -> None:
    section = run_quick("soak", tmp_path, "soak")
    # 3 epochs of 95 good samples: none duplicated, lost or unexpected; 5 corrupt ones skipped in each.
    assert "| 3 | 285 | 0 | 0 | 0 | 15 |" in section
    assert "Machine: " in section and "RSS after each epoch" in section


@pytest.mark.slow
def test_remote_benchmark_quick_writes_objects_and_tar_sections(tmp_path: Path) -> None:
    text = run_quick("remote", tmp_path, "bench", "bench-tar")
    assert "ceiling: bare concurrent reads" in text
    assert "aloader, TarShardDataset" in text


def test_a_stalled_run_fails_the_benchmark_with_every_threads_stack() -> None:
    """A loader that stops delivering (the epoch limit is only checked as batches arrive) does not hang the
    benchmark: after ``STALL_SECONDS`` the process exits with code 1 and every thread's traceback."""
    script = (
        "import threading\n"
        "import benchmarks.core as core\n"
        "core.STALL_SECONDS = 0.5\n"
        "print(core.watched(lambda: (1, 2.0)))\n"
        "core.watched(lambda: (0, float(threading.Event().wait())))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert result.returncode == 1
    assert result.stdout.strip() == "(1, 2.0)"  # a run that ends in time is not touched
    assert "Timeout" in result.stderr and "Thread" in result.stderr

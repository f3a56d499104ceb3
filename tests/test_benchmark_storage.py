"""The storage benchmark's quick mode runs end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import pytest

from benchmarks import storage


@pytest.mark.slow
def test_storage_benchmark_quick_mode(capsys: pytest.CaptureFixture[str]) -> None:
    results = storage.main(["--quick"])
    assert [r.system for r in results] == [storage.LABELS[name] for name in storage.SYSTEMS]
    assert all(r.samples > 0 and r.seconds > 0 and r.peak_rss_mib > 0 for r in results)
    assert "| system | samples |" in capsys.readouterr().out

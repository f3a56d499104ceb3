"""Run ``aloader bench`` from Python on a small embedded dataset and read its JSON figures.

The same as ``aloader bench --samples 128 --latency 0.01 --json FILE`` on the command line.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from aloader.cli import main

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        status = main(["bench", "--samples", "128", "--latency", "0.01", "--no-progress", "--json", str(out)])
        assert status == 0, f"aloader bench exited with {status}"
        report = json.loads(out.read_text())
    speedups = {s["system"]: s["speedup_over_torch"] for s in report["systems"]}
    for system in report["systems"]:
        assert system["samples"] == 128, system
    print(f"speed-up over torch's DataLoader: {speedups}")
    print("OK")

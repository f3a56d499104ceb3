"""Run ``aloader bench --workload images`` from Python on a few JPEGs and read its JSON figures.

The workload (``docs/bench.md``): an unchanged torch ``Dataset`` doing ``requests.get`` + Pillow decode + random
crop and flip per sample, served with a delay per GET from the bench's object server, run by aloader with
``num_workers=2`` and compared with the machine's CPU bound, which the bench measures itself. The full run is
``aloader bench --workload images``; this one is small enough for a smoke test.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from aloader.cli import main

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        argv = ["bench", "--workload", "images", "--samples", "64", "--batch-size", "16", "--latency", "0.01"]
        status = main([*argv, "--systems", "aloader-w2,cpu-bound", "--no-progress", "--json", str(out)])
        assert status == 0, f"aloader bench exited with {status}"
        report = json.loads(out.read_text())
    for system in report["systems"]:
        assert system["samples"] == 64, system
        print(f"{system['system']}: {system['samples_per_second']:.0f} samples/s")
    print("OK")

"""Run ``aloader bench --workload images`` from Python on a few JPEGs and read its JSON figures.

The workload (``docs/bench.md``): an unchanged torch ``Dataset`` doing ``requests.get`` + Pillow decode + random
crop and flip per sample, served with a delay per GET from the bench's object server, run by aloader with
``num_workers=2`` and compared with the machine's CPU bound, which the bench measures itself. The full run is
``aloader bench --workload images``; this one is small enough for a smoke test. It runs two rounds
(``--rounds 2``, ``docs/bench.md``): each system twice, round after round; the rows are each system's median round,
the ratios the medians of each round's ratios, and the JSON keeps every round.
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
        systems = ["--systems", "aloader-w2,cpu-bound", "--rounds", "2"]
        status = main([*argv, *systems, "--no-progress", "--json", str(out)])
        assert status == 0, f"aloader bench exited with {status}"
        report = json.loads(out.read_text())
    for system in report["systems"]:
        assert system["samples"] == 64, system
        runs = [
            r["samples_per_second"] for rounds in report["rounds"] for r in rounds if r["system"] == system["system"]
        ]
        assert len(runs) == 2, runs
        assert system["samples_per_second"] in runs, runs  # its median round
        each = " / ".join(f"{run:.0f}" for run in runs)
        print(f"{system['system']}: {system['samples_per_second']:.0f} samples/s (rounds: {each})")
    print(f"aloader-w2 vs the CPU bound: {report['systems'][0]['ratios']['vs_cpu_bound']:.2f}x")
    print("OK")

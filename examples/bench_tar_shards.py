"""Run ``aloader bench`` on a directory of WebDataset tar shards and read its JSON figures.

The same as ``aloader bench DIR --systems ceiling,aloader,torch --json FILE`` on the command line; a brace pattern
(``DIR/train-{000000..000003}.tar``) or an ``s3://bucket/prefix/`` holding ``.tar`` files works the same way.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from aloader.bench.sources import synthetic_images, synthetic_shards
from aloader.cli import main

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        for key, data in synthetic_shards(synthetic_images(96), shards=4).items():  # 4 shards of 24 samples
            (shards / Path(key).name).write_bytes(data)
        out = Path(tmp) / "bench.json"
        argv = ["bench", str(shards), "--systems", "ceiling,aloader,torch", "--batch-size", "8"]
        status = main([*argv, "--no-progress", "--json", str(out)])
        assert status == 0, f"aloader bench exited with {status}"
        report = json.loads(out.read_text())
    assert report["config"]["format"] == "tar"
    for system in report["systems"]:
        assert system["samples"] == 96, system
    print({s["system"]: round(s["samples_per_second"]) for s in report["systems"]})
    print("OK")

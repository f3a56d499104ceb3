"""``aloader bench`` end to end: the embedded default on a tiny dataset, a local directory, Ctrl-C, and the images
workload."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aloader.bench.config import BenchConfig, SystemName, default_systems
from aloader.bench.images import augment, synthetic_jpegs
from aloader.bench.report import BenchReport, SystemResult, render_table
from aloader.bench.samples import decode_array
from aloader.bench.sources import synthetic_images, synthetic_shards

BENCH = [sys.executable, "-m", "aloader", "bench"]


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, check=False)


def write_images(root: Path, count: int) -> Path:
    """``count`` synthetic samples as files under ``root``, a local source for the bench."""
    for key, data in synthetic_images(count).items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_bench(
        "--samples", "96", "--batch-size", "8", "--latency", "0.005", "--json", str(out), "--plot", str(plot)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["interrupted"] is False
    assert report["config"]["urls"] == 96
    assert [s["system"] for s in report["systems"]] == list(default_systems())
    for system in report["systems"]:
        assert system["samples"] == 96, system
        assert system["bytes"] == 96 * 3 * 64 * 64, system
        assert system["error"] is None
        assert system["first_batch_seconds"] is not None
        assert system["latency_p50_ms"] <= system["latency_p99_ms"]
        assert system["peak_rss_mb"] > 0
    by_name = {s["system"]: s for s in report["systems"]}
    assert by_name["torch"]["speedup_over_torch"] == pytest.approx(1.0)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| system | samples | samples/s | MB/s |" in result.stdout
    assert "127.0.0.1" in result.stdout  # the embedded server is local


@pytest.mark.slow
def test_local_directory_and_system_choice(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        str(write_images(tmp_path / "data", 40)),
        "--systems",
        "aloader,torch",
        "--num-workers",
        "0",
        "--epochs",
        "2",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(s["system"], s["samples"]) for s in report["systems"]] == [("aloader", 80), ("torch", 80)]


@pytest.mark.slow
def test_rounds_report_medians(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        str(write_images(tmp_path / "data", 24)),
        "--systems",
        "aloader,torch",
        "--num-workers",
        "0",
        "--rounds",
        "2",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "2 rounds" in result.stdout
    assert "Medians of 2 rounds" in result.stdout
    report = json.loads(out.read_text())
    assert report["config"]["rounds"] == 2
    rounds = report["rounds"]
    assert [[(s["system"], s["samples"]) for s in r] for r in rounds] == [[("aloader", 24), ("torch", 24)]] * 2
    for row in report["systems"]:  # each row is one of its system's rounds: the slower one of two
        runs = [s["samples_per_second"] for r in rounds for s in r if s["system"] == row["system"]]
        assert row["samples_per_second"] == min(runs)
    per_round = [r[0]["samples_per_second"] / r[1]["samples_per_second"] for r in rounds]
    speedup = report["systems"][0]["speedup_over_torch"]
    assert speedup == pytest.approx(sum(per_round) / 2)  # the median of two: their mean


def _result(system: SystemName, per_second: float, pss: float, **extra: Any) -> SystemResult:
    return SystemResult(
        system=system,
        title=system,
        samples=100,
        bytes=0,
        seconds=100 / per_second,
        first_batch_seconds=0.1,
        latency_p50_ms=None,
        latency_p99_ms=None,
        peak_rss_mb=pss,
        peak_pss_mb=pss,
        interrupted=extra.get("interrupted", False),
    )


def test_medians_of_rounds_pair_each_ratio_within_its_round() -> None:
    config = BenchConfig(urls=("a",), systems=("aloader", "torch"))
    rounds = [
        [_result("aloader", 200, 10), _result("torch", 100, 20)],  # 2x, memory 0.5x
        [_result("aloader", 150, 30), _result("torch", 150, 20)],  # 1x, 1.5x
        [_result("aloader", 120, 20), _result("torch", 40, 20)],  # 3x, 1x
        [_result("aloader", 10, 99, interrupted=True)],  # cut short by Ctrl-C: not a median candidate
    ]
    report = BenchReport.of_rounds("machine", "source", config, rounds, interrupted=True)
    assert [(r.system, r.samples_per_second) for r in report.results] == [("aloader", 150), ("torch", 100)]
    aloader_row = report.results[0]
    assert report.speedup(aloader_row) == pytest.approx(2.0)  # the median of 2, 1 and 3 (not 150 / 100)
    assert report.memory_ratio(aloader_row, "torch") == pytest.approx(1.0)
    assert "Medians of 4 rounds" in render_table(report)
    # One round: the rows are the run itself, and no line about rounds.
    single = BenchReport("machine", "source", config, rounds[0], interrupted=False)
    assert single.speedup(single.results[0]) == pytest.approx(2.0)
    assert "Medians" not in render_table(single)


def test_bad_arguments_exit_with_usage() -> None:
    result = run_bench("--systems", "nope")
    assert result.returncode == 2
    assert "unknown ['nope']" in result.stderr
    missing = run_bench("/no/such/dir")
    assert missing.returncode != 0
    assert "/no/such/dir" in missing.stderr


def test_tar_format_without_shards_says_so(tmp_path: Path) -> None:
    (tmp_path / "a.npy").write_bytes(b"not a shard")
    result = run_bench(str(tmp_path), "--format", "tar")
    assert result.returncode != 0
    assert f"no .tar shards found in {tmp_path}" in result.stderr


@pytest.mark.slow
def test_ctrl_c_stops_and_prints_what_was_measured(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Slow enough that the run is still going when the first samples have arrived.
    process = subprocess.Popen(
        [
            *BENCH,
            "--samples",
            "4000",
            "--latency",
            "0.05",
            "--systems",
            "torch",
            "--num-workers",
            "0",
            "--json",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stderr is not None
        seen = b""
        # The progress bar (stderr) shows a non-zero count once samples were measured: then press Ctrl-C.
        while not re.search(rb"\| *[1-9]\d*/4000", seen):
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk, f"bench ended before any progress: {seen.decode(errors='replace')}"
            seen += chunk
        os.killpg(process.pid, signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    text = stdout.decode()
    assert "(interrupted)" in text and "Interrupted" in text
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    assert 0 < report["systems"][0]["samples"] < 4000


@pytest.mark.slow
def test_embedded_default_as_tar_shards(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        "--format", "tar", "--samples", "72", "--batch-size", "8", "--latency", "0.005", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["config"]["format"] == "tar"
    assert report["config"]["urls"] == 16  # the shards
    assert [s["system"] for s in report["systems"]] == list(default_systems())
    for system in report["systems"]:
        assert system["error"] is None
        assert system["samples"] == 72, system
        assert system["bytes"] == 72 * 3 * 64 * 64, system
        assert system["latency_p50_ms"] is None  # streamed samples have no request of their own to time
    assert "TarShardDataset" in result.stdout
    assert "tar shards" in result.stdout


@pytest.mark.slow
def test_local_tar_shards_directory_and_brace_pattern(tmp_path: Path) -> None:
    shards = synthetic_shards(synthetic_images(30), 3)
    (tmp_path / "shards").mkdir()
    for key, data in shards.items():
        (tmp_path / "shards" / key.rsplit("/", 1)[1]).write_bytes(data)
    out = tmp_path / "bench.json"
    common = ("--systems", "ceiling,aloader,torch", "--num-workers", "2", "--batch-size", "4", "--json", str(out))
    result = run_bench(str(tmp_path / "shards"), *common)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["config"]["format"] == "tar"
    assert [(s["system"], s["samples"]) for s in report["systems"]] == [("ceiling", 30), ("aloader", 30), ("torch", 30)]
    # Two of the three shards by a brace pattern, every system stopping after 12 samples (three batches of 4).
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    result = run_bench(pattern, *common, "--samples", "12")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["config"]["urls"] == 2
    assert [s["samples"] for s in report["systems"]] == [12, 12, 12]


@pytest.mark.slow
def test_images_workload_end_to_end(tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    systems = ["torch-w2", "aloader-w2", "cpu-bound"]
    result = run_bench(
        "--workload",
        "images",
        "--samples",
        "64",
        "--batch-size",
        "16",
        "--latency",
        "0.002",
        "--systems",
        ",".join(systems),
        "--no-progress",
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["config"]["workload"] == "images"
    assert report["config"]["urls"] == 64
    assert [s["system"] for s in report["systems"]] == systems
    for system in report["systems"]:
        assert system["error"] is None
        assert system["samples"] == 64, system
        assert system["distinct_samples"] == 64, system  # every sample, none twice
        assert system["peak_rss_mb"] > 0
        assert set(system["ratios"]) == {
            "vs_torch_w2",
            "vs_torch_w8",
            "vs_cpu_bound",
            "vs_spdl",
            "memory_vs_torch_w2",
        }
        assert system["ratios"]["vs_spdl"] is None  # SPDL did not run
    by_name = {s["system"]: s for s in report["systems"]}
    for name in ("torch-w2", "aloader-w2"):
        assert by_name[name]["bytes"] == 64 * 3 * 224 * 224  # uint8 CHW crops
        assert by_name[name]["first_batch_seconds"] is not None
        assert by_name[name]["cpu_ms_per_sample"] is None
    assert by_name["torch-w2"]["ratios"]["vs_torch_w2"] == pytest.approx(1.0)
    bound = by_name["cpu-bound"]
    assert bound["cpu_ms_per_sample"] > 0
    assert bound["first_batch_seconds"] is None
    assert bound["ratios"]["vs_cpu_bound"] == pytest.approx(1.0)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `aloader-w2`: aloader, num_workers=2 | 64 |" in result.stdout
    assert "JPEG images" in result.stdout and "127.0.0.1" in result.stdout


def test_images_workload_arguments() -> None:
    with_source = run_bench("--workload", "images", "/some/dir")
    assert with_source.returncode == 2
    assert "--workload images serves its own JPEGs" in with_source.stderr
    wrong_system = run_bench("--workload", "images", "--systems", "torch")
    assert wrong_system.returncode == 2
    assert "unknown ['torch']; choose from torch-w2, torch-w8" in wrong_system.stderr


def test_images_are_decoded_cropped_and_deterministic() -> None:
    images = synthetic_jpegs(3, seed=1)
    assert images == synthetic_jpegs(3, seed=1)
    assert sorted(images) == ["images/000000.jpg", "images/000001.jpg", "images/000002.jpg"]
    for data in images.values():
        assert data[:2] == b"\xff\xd8"  # a JPEG
        tensor = augment(data)
        assert tensor.shape == (3, 224, 224)
        assert tensor.dtype == torch.uint8
        assert tensor.is_contiguous()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.asfortranarray(np.arange(15, dtype=np.float32).reshape(3, 5)),
        np.array(3.5),
        np.zeros((0, 4), dtype=np.int64),
    ],
)
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_decode_array_equals_numpys_load(array: Any, version: tuple[int, int]) -> None:
    """The bench's .npy decode (its header parsed under a lock, see samples.py) gives np.load's tensor: values,
    dtype, shape and strides, for every format version."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    ours = decode_array(buffer.getvalue())
    theirs = torch.from_numpy(np.load(io.BytesIO(buffer.getvalue()), allow_pickle=False))
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and ours.stride() == theirs.stride()
    assert torch.equal(ours, theirs)

"""`dvd-bench-vision` on the CPU: raw and served figures for the tiny Flash checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO_ROOT

from protos import shm


def run_bench(model: Path, output: Path, *args: str) -> tuple[dict[str, Any], str]:
    """``dvd-bench-vision`` on the CPU with ``args``: its JSON report and its table."""
    argv = [sys.executable, "-m", "benchmarks.vision", "--model", str(model), "--device", "cpu"]
    done = subprocess.run(
        [*argv, *args, "--output", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text()), done.stdout


pytestmark = pytest.mark.processes  # dvd-bench-vision starts the vision service


def test_bench_vision_reports_raw_and_served_figures(tiny_flash_models, tmp_path):
    report, table = run_bench(
        tiny_flash_models["hf"],
        tmp_path / "vision.json",
        "--batch-sizes",
        "1",
        "--raw-seconds",
        "0",
        "--max-batch-tiles",
        "4",
        "--concurrency",
        "1",
        "3",
        "--vir",
        "off",
        "auto",
        "max",
        "--requests",
        "3",
        "--rounds",
        "2",
        "--image-size",
        "700x300",
        "--stages",
    )

    # 700x300 is a 5x2 grid plus its thumbnail: 11 tiles; raw covers 1, the batch cap and 11.
    assert report["settings"]["tiles_per_image"] == 11
    assert [r["batch_tiles"] for r in report["raw"]] == [1, 4, 11]
    assert all(r["tiles_per_s"] > 0 and r["iterations"] >= 2 for r in report["raw"])

    served = {(s["vir"], s["concurrency"]): s for s in report["served"]}
    assert set(served) == {(v, c) for v in ("off", "auto", "max") for c in (1, 3)}
    for level in served.values():
        assert level["requests"] == 3
        assert level["tiles_per_image"] == 11
        assert level["cache_hits"] == 0  # encoded every time, not answered by the cache
        assert level["tiles_per_s"] > 0 and level["ratio_to_raw"] > 0
        assert 0 < level["ratio_to_best_raw"] <= level["ratio_to_raw"]
        latency = level["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
        # The server's device-busy counter was read around the level: a fraction of its time.
        assert 0 < level["device_busy"] <= 1.05
        assert 0 < level["tiles_per_pass"] <= 4  # the batch cap
        assert level["cpu_ms_per_image"] > 0  # the server's CPU time, per image
        # The bench client's shared memory has room for every concurrent call: no row streams.
        assert level["shared_memory_share"] == (1.0 if shm.available() else 0.0)
    # In process, without gRPC: the engine fed cut tiles, then the pipeline fed the bytes.
    stages = {(s["stage"], s["vir"], s["concurrency"]): s for s in report["stages"]}
    assert set(stages) == {
        (stage, v, c)
        for stage in ("engine", "pipeline")
        for v in ("off", "auto", "max")
        for c in (1, 3)
    }
    for level in stages.values():
        assert level["requests"] == 3 and level["tiles_per_image"] == 11
        assert level["tiles_per_s"] > 0 and level["ratio_to_raw"] > 0
        assert 0 < level["device_busy"] <= 1.05
    assert stages[("engine", "max", 1)]["visual_tokens_per_image"] == 11 * 64
    # The router's modes show in the rows sent: 256 per tile, 64 per tile, in between.
    assert served[("off", 1)]["visual_tokens_per_image"] == 11 * 256
    assert served[("max", 1)]["visual_tokens_per_image"] == 11 * 64
    # Alone, an image of 11 tiles goes through passes of 4, 4 and 3 tiles.
    assert served[("off", 1)]["tiles_per_pass"] == pytest.approx(11 / 3)
    assert 11 * 64 < served[("auto", 1)]["visual_tokens_per_image"] < 11 * 256
    assert report["alone"]["tiles"] == 11
    # Two rounds, each with every figure; the report keeps the median round of each.
    assert len(report["rounds"]["raw"]) == len(report["rounds"]["served"]) == 2
    assert all(level["rounds"] == 2 for level in report["served"])

    assert "| raw batch (tiles) | ms per pass | tiles/s | eager tiles/s |" in table
    assert "| auto | 3 | 3 |" in table
    assert "| pipeline | auto | 3 |" in table
    assert "one 11-tile image alone" in table


def test_bench_vision_stand_in_device_measures_the_host_side(tiny_flash_models, tmp_path):
    """``--stand-in-pass-ms``: the server (``benchmarks.stand_in``) and the in-process levels
    run on a device that only sleeps, so they measure what the host adds. 11 tiles at a cap of
    4 are passes of 4, 4 and 3 tiles: 8 + 8 + 7 = 23 ms of stand-in device per image, one pass
    at a time."""
    report, table = run_bench(
        tiny_flash_models["hf"],
        tmp_path / "stand-in.json",
        "--no-raw",
        "--stages",
        "--stand-in-pass-ms",
        "5",
        "1",
        "--overlap-preparation",
        "on",
        "--max-batch-tiles",
        "4",
        "--concurrency",
        "1",
        "--vir",
        "off",
        "auto",
        "--requests",
        "4",
        "--image-size",
        "700x300",
    )
    assert report["settings"]["stand_in_pass_ms"] == [5.0, 1.0]
    assert report["settings"]["overlap_preparation"] == "on"
    stages = {(s["stage"], s["vir"]): s for s in report["stages"]}
    assert set(stages) == {(stage, v) for stage in ("engine", "pipeline") for v in ("off", "auto")}
    for level in stages.values():
        assert level["stand_in_pass_ms"] == [5.0, 1.0]
    served = {s["vir"]: s for s in report["served"]}
    assert set(served) == {"off", "auto"}
    for level in (*stages.values(), *served.values()):
        assert level["latency_ms"]["p50"] >= 23.0  # never faster than the stand-in device
        # The stand-in counts its passes as device time: at least its 23 ms per image (any
        # other split of 11 tiles has more passes, each 5 ms), within the level's own time.
        device_s = level["device_busy"] * level["seconds"]
        assert device_s >= 0.023 * level["requests"] * 0.999, (device_s, level["requests"])
        assert level["device_busy"] <= 1.05
    # The stand-in's rows have the real shapes; its p0 of zero compresses nothing.
    assert stages[("pipeline", "auto")]["visual_tokens_per_image"] == 11 * 256
    assert served["auto"]["visual_tokens_per_image"] == 11 * 256
    # A lone image's budget counts the stand-in's pass for its 11 tiles (5 + 10 x 1 ms).
    assert report["alone"]["raw_forward_ms"] == 15.0
    assert report["alone"]["budget_ms"] == 40.0
    assert "a stand-in device: 5 ms + 1 ms per more tile" in table
    assert "2 x stand-in forward of 11 tiles + 10 ms = 40.0 ms" in table
    assert "| raw batch (tiles) |" not in table  # no raw figures were taken

"""``make serve`` / ``dvd-serve`` itself: the launcher starts the vision and the language
service on the tiny model, answers a chat request, and stops cleanly on SIGTERM (both
services and every process they started gone, the ports released), within bounded times.

Settings reach both services through ``DVD_*`` variables (the launcher's documented way):
``DVD_NUM_FRAMES=2`` wins over the checkpoint's video processor config (3 frames).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import (
    LLM_TEST_ENV,
    REPO_ROOT,
    ServerProcess,
    encode_video,
    http_ok,
    mixed_frames,
    video_data_url,
)

pytestmark = [pytest.mark.slow, pytest.mark.processes]

START_TIMEOUT_S = 300  # both services up, the engine included, on a loaded 2-core machine
STOP_TIMEOUT_S = 60  # the launcher gives its services 40 s before it kills them


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def test_make_serve_runs_dvd_serve():
    """What ``make serve`` runs (``make -n``: printed, nothing executed)."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    # Run as a top-level make even under `make test` (CI): an inherited MAKELEVEL/MAKEFLAGS
    # makes make print "Entering directory" lines around the recipe.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    printed = subprocess.run(
        ["make", "--no-print-directory", "-n", "serve"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert printed.strip().splitlines()[-1].endswith("/dvd-serve"), printed


def test_dvd_serve_answers_and_stops_cleanly(tiny_models, tmp_path: Path, log_dir: Path):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_models["hf"], model)
    (model / "video_preprocessor_config.json").write_text(json.dumps({"num_frames": 3}))
    command = Path(sys.executable).with_name("dvd-serve")
    assert command.exists(), "the dvd-serve entry point is not installed in this environment"
    serve = ServerProcess(
        "dvd-serve",
        [str(command), "--model", str(model), "--port", "0", "--vision-port", "0"],
        log_dir,
        env={**LLM_TEST_ENV, "DVD_NUM_FRAMES": "2", "DVD_METRICS_PORT": "0"},
        report_ports=True,
    )
    try:
        ports = serve.reported_ports(START_TIMEOUT_S)
        host, port, vision_port = ports["host"], ports["port"], ports["vision_port"]
        base_url = f"http://{host}:{port}"
        serve.wait_until(lambda: http_ok(f"{base_url}/health"), 60, "healthy")

        video = encode_video(mixed_frames(8, width=320, height=240, seed=61))
        reply = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={
                "model": httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": video_data_url(video)}},
                            {"type": "text", "text": "What happens in this video?"},
                        ],
                    }
                ],
                "temperature": 0,
                "max_tokens": 8,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == 8
        assert body["vision"]["frames"] == 2
        assert body["usage"]["prompt_tokens_details"]["video_tokens"] == 2 * 256
        # The vision service's metrics page, on the free port it bound (DVD_METRICS_PORT=0),
        # as dvd-serve reports it: it counted the video.
        metrics_url = f"http://{host}:{ports['vision_metrics_port']}/metrics"
        assert "dvd:vision_videos_total 1.0" in httpx.get(metrics_url, timeout=10).text

        # SIGTERM to the launcher alone (not its process group): it stops both services.
        started = time.monotonic()
        os.kill(serve.proc.pid, signal.SIGTERM)
        code = serve.proc.wait(STOP_TIMEOUT_S)
        assert code == 0, serve.log_tail()
        while _group_alive(serve.proc.pid) and time.monotonic() - started < STOP_TIMEOUT_S:
            time.sleep(0.2)
        assert not _group_alive(serve.proc.pid), "a process of dvd-serve outlived it"
        assert not _listening(host, port) and not _listening(host, vision_port)
        assert serve.port_file is not None and not serve.port_file.exists()
    finally:
        serve.stop()

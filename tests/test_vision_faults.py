"""Faults in the vision service's forward passes, on a real server process.

``faulty_vision_server.py`` is the real server with failures injected into the passes that
contain a flat tile of grey level 7 (an error), 8 (out of device memory) or 9 (a broken
device). Healthy passes run the real encoder, so the answers after a fault are checked against
a clean server on the same checkpoint.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    REPO_ROOT,
    ServerProcess,
    encode_image,
    encode_over_grpc,
    free_port,
    grpc_serving,
    noise_image,
)
from PIL import Image

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def flat(level: int) -> bytes:
    return encode_image(Image.fromarray(np.full((448, 448, 3), level, dtype=np.uint8)))


def start_faulty(name: str, model: Path, log_dir: Path, *args: str) -> tuple[ServerProcess, str]:
    port = free_port()
    argv = [
        sys.executable,
        str(REPO_ROOT / "tests" / "faulty_vision_server.py"),
        "--model",
        str(model),
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *args,
    ]
    server = ServerProcess(name, argv, log_dir)
    target = f"127.0.0.1:{port}"
    server.wait_until(lambda: grpc_serving(target), timeout=120, what="serving")
    return server, target


@pytest.fixture(scope="module")
def faulty_vision(tiny_models, log_dir) -> Iterator[tuple[ServerProcess, str]]:
    server, target = start_faulty(
        "faulty-vision", tiny_models["hf"], log_dir, "--max-batch-tiles", "4"
    )
    try:
        yield server, target
    finally:
        server.stop()


GOOD = [encode_image(noise_image(900, 600, seed=41)), encode_image(noise_image(448, 448, 42))]


def test_a_failed_pass_fails_its_request_and_the_service_keeps_serving(
    faulty_vision, vision_targets
):
    server, target = faulty_vision
    with pytest.raises(grpc.RpcError) as caught:
        encode_over_grpc(target, [GOOD[1], flat(7)])  # a multi-image request
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "vision encoder failed" in caught.value.details()
    assert "RuntimeError: injected failure" in caught.value.details()
    assert grpc_serving(target) and server.alive

    # Later requests, several images, several passes (7 + 1 tiles, 4 per pass): exactly what
    # a clean server on the same checkpoint answers.
    after = encode_over_grpc(target, GOOD)
    clean = encode_over_grpc(vision_targets["hf"], GOOD)
    assert [r.header.num_tiles for r in after] == [7, 1]
    for got, expected in zip(after, clean, strict=True):
        assert torch.equal(got.embeddings, expected.embeddings)


def test_only_the_images_of_the_failed_pass_fail(faulty_vision):
    """A poisoned request and healthy ones at once: the healthy ones that did not share its
    pass succeed, and every call ends (none hangs)."""
    _, target = faulty_vision
    with ThreadPoolExecutor(max_workers=6) as pool:
        poisoned = pool.submit(encode_over_grpc, target, [flat(7)], timeout=30)
        time.sleep(0.3)  # the poisoned pass is running (it fails after 1 s)
        healthy = [pool.submit(encode_over_grpc, target, [GOOD[0]], timeout=30) for _ in range(4)]
        with pytest.raises(grpc.RpcError) as caught:
            poisoned.result()
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        for future in healthy:
            (reply,) = future.result()  # queued behind the failed pass: served
            assert reply.header.num_tiles == 7


def test_out_of_memory_is_resource_exhausted(faulty_vision):
    _, target = faulty_vision
    with pytest.raises(grpc.RpcError) as caught:
        encode_over_grpc(target, [flat(8), GOOD[1]])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of device memory" in caught.value.details()
    assert grpc_serving(target)
    (reply,) = encode_over_grpc(target, [GOOD[1]])
    assert reply.header.num_tiles == 1


def test_a_broken_device_flips_health_fails_pending_calls_and_exits(tiny_models, log_dir):
    # One tile per pass, so the second request is queued, not in the broken pass.
    server, target = start_faulty(
        "broken-vision", tiny_models["hf"], log_dir, "--max-batch-tiles", "1"
    )
    statuses: list[int] = []

    def watch() -> None:
        with grpc.insecure_channel(target) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="")
            )
            try:
                for reply in stream:
                    statuses.append(reply.status)
            except grpc.RpcError:
                pass  # the server went away

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            broken = pool.submit(encode_over_grpc, target, [flat(9)], timeout=30)
            time.sleep(0.3)
            queued_at = time.monotonic()
            queued = pool.submit(encode_over_grpc, target, [GOOD[0]], timeout=30)
            with pytest.raises(grpc.RpcError) as in_pass:
                broken.result()
            with pytest.raises(grpc.RpcError) as waiting:
                queued.result()
            failed_after = time.monotonic() - queued_at
        assert in_pass.value.code() == grpc.StatusCode.INTERNAL
        assert "AcceleratorError" in in_pass.value.details()
        assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed_after < 5  # failed fast: no waiting for a deadline
        server.proc.wait(timeout=30)
        assert server.proc.returncode == 1
        watcher.join(10)
        assert statuses[0] == SERVING and NOT_SERVING in statuses
        assert "reporting NOT_SERVING and exiting" in server.log_tail(200)
    finally:
        server.stop()

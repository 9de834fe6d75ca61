"""Faults in the vision service's forward passes, on a real server process.

``faulty_vision_server.py`` is the real server with failures injected into the passes that
contain a flat tile of grey level 7 (an error), 8 (out of device memory) or 9 (a broken
device). Healthy passes run the real encoder, so the answers after a fault are checked against
a clean server on the same checkpoint.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from faulty_vision_server import FAULT_RELEASED, FAULT_STARTED
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    REPO_ROOT,
    ServerProcess,
    encode_image,
    encode_over_grpc,
    grpc_serving,
    noise_image,
    same_pixels_other_file,
    serving_vision,
)
from PIL import Image

pytestmark = pytest.mark.processes  # every test starts its own faulty server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def flat(level: int) -> bytes:
    return encode_image(Image.fromarray(np.full((448, 448, 3), level, dtype=np.uint8)))


def start_faulty(name: str, model: Path, log_dir: Path, *args: str) -> tuple[ServerProcess, str]:
    """The faulty server; its poisoned passes hold while ``hold_file(server)`` says so."""
    argv = [
        sys.executable,
        str(REPO_ROOT / "tests" / "support" / "faulty_vision_server.py"),
        "--model",
        str(model),
        "--port",
        "0",
        "--no-metrics",
        *args,
    ]
    hold = log_dir / f"{name}.hold"
    server = ServerProcess(
        name, argv, log_dir, env={"DVD_TEST_FAULT_HOLD": str(hold)}, report_ports=True
    )
    return server, serving_vision(server)


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


def hold_file(server: ServerProcess) -> Path:
    return server.log_path.with_suffix(".hold")


def times_logged(server: ServerProcess, line: str) -> int:
    return server.log_path.read_text(errors="replace").count(line)


def fresh(data: bytes) -> bytes:
    """Another file of the same picture, never sent before: the embedding cache (keyed by a
    file's bytes) cannot answer it, so its tiles really queue for a pass."""
    return same_pixels_other_file(data, uuid.uuid4().hex)


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
    server, target = faulty_vision
    healthy_images = [fresh(GOOD[0]) for _ in range(4)]  # 7 tiles each
    started = times_logged(server, FAULT_STARTED)
    # The poisoned pass fails only once all 28 healthy tiles are queued behind it.
    hold_file(server).write_text("28")
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            poisoned = pool.submit(encode_over_grpc, target, [flat(7)], timeout=30)
            # The healthy images are sent once the poisoned pass runs: none can join it.
            server.wait_until(
                lambda: times_logged(server, FAULT_STARTED) > started, 30, "in the poisoned pass"
            )
            healthy = [
                pool.submit(encode_over_grpc, target, [image], timeout=30)
                for image in healthy_images
            ]
            with pytest.raises(grpc.RpcError) as caught:
                poisoned.result()
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            for future in healthy:
                (reply,) = future.result()  # queued behind the failed pass: served
                assert reply.header.num_tiles == 7
    finally:
        hold_file(server).unlink(missing_ok=True)
    assert FAULT_RELEASED.format(queued=28) in server.log_tail(200)


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
    # The broken pass fails only once the second request's 7 tiles are queued behind it.
    hold_file(server).write_text("7")
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            broken = pool.submit(encode_over_grpc, target, [flat(9)], timeout=30)
            server.wait_until(
                lambda: times_logged(server, FAULT_STARTED) > 0, 30, "in the broken pass"
            )
            queued = pool.submit(encode_over_grpc, target, [fresh(GOOD[0])], timeout=30)
            with pytest.raises(grpc.RpcError) as in_pass:
                broken.result()
            with pytest.raises(grpc.RpcError) as waiting:
                queued.result()
        assert FAULT_RELEASED.format(queued=7) in server.log_tail(200)
        assert in_pass.value.code() == grpc.StatusCode.INTERNAL
        assert "AcceleratorError" in in_pass.value.details()
        # Failed by the engine, with its reason (not by a deadline, nor by the connection
        # going away when the process exits).
        assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "replica is restarting" in waiting.value.details(), waiting.value.details()
        server.proc.wait(timeout=30)
        assert server.proc.returncode == 1
        watcher.join(10)
        assert statuses[0] == SERVING and NOT_SERVING in statuses
        assert "reporting NOT_SERVING and exiting" in server.log_tail(200)
    finally:
        hold_file(server).unlink(missing_ok=True)
        server.stop()

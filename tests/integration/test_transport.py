"""The two embedding transports: gRPC streaming and same-host shared memory.

Both must deliver bit-identical rows; shared memory must never leak segments (a receiver killed
mid-call, a vision service restarted while ranges are held), and every failure to use it must
fall back to streaming, unless shared memory was required.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import (
    REPO_ROOT,
    ServerProcess,
    encode_image,
    noise_image,
    process_fixture,
    restart_vision_server,
    same_pixels_other_file,
    start_vision_server,
)

from llm_server import metrics
from llm_server.errors import VisionUnavailable
from llm_server.vision.arena import EmbeddingArena
from llm_server.vision.grpc_client import GrpcVisualEncoder
from protos import shm
from protos.messages import EncodeCall, EncodeOptions, ImageInput

pytestmark = pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory here")

IMAGES = [
    ImageInput(encode_image(noise_image(900, 500, seed=1), "PNG")),
    ImageInput(encode_image(noise_image(300, 300, seed=2), "PNG"), max_tiles=1),
    ImageInput(encode_image(noise_image(640, 1000, seed=3), "JPEG")),
]


def _encoder(target: str, transport: str) -> GrpcVisualEncoder:
    return GrpcVisualEncoder(
        target,
        timeout_s=60,
        expected_hidden_size=128,
        transport=transport,  # type: ignore[arg-type]
        shared_memory_bytes=64 << 20,
    )


def _bytes_received(transport: str) -> float:
    return metrics.embedding_bytes.labels(transport=transport)._value.get()


async def _encode(target: str, transport: str, options: EncodeOptions) -> list[torch.Tensor]:
    encoder = _encoder(target, transport)
    try:
        call = EncodeCall(IMAGES, (), options, f"transport-{transport}")
        results = (await encoder.encode(call)).images
    finally:
        await encoder.close()
    return [result.embeddings for result in results]


@pytest.mark.parametrize("vir", [None, "off"])
def test_both_transports_give_bit_identical_rows(flash_vision, vir):
    target, _ = flash_vision["hf"]
    options = EncodeOptions(max_tiles=4, vir=vir)
    streamed_before, shared_before = _bytes_received("grpc"), _bytes_received("shared_memory")
    streamed = asyncio.run(_encode(target, "grpc", options))
    streamed_bytes = _bytes_received("grpc") - streamed_before
    shared = asyncio.run(_encode(target, "shared-memory", options))
    shared_bytes = _bytes_received("shared_memory") - shared_before
    total = sum(rows.numel() * rows.element_size() for rows in streamed)
    # Each call really took its own path...
    assert streamed_bytes == total and shared_bytes == total
    # ...and the rows are the same, bit for bit.
    assert len(streamed) == len(shared) == len(IMAGES)
    for a, b in zip(streamed, shared, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_language_stacks_use_the_transport_they_were_given(stacks):
    """The e2e exactness tests run "hf" over shared memory and "original" over gRPC."""
    from chats import CONVERSATIONS, greedy

    for name, transport in (("hf", "shared_memory"), ("original", "grpc")):
        base_url = stacks[name].base_url
        before = _scrape_bytes(base_url)
        greedy(base_url, CONVERSATIONS["one_image"])
        after = _scrape_bytes(base_url)
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert moved[transport] > 0, (name, moved)
        assert sum(moved.values()) == moved[transport], (name, moved)


def _scrape_bytes(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    pattern = r'^dvd:image_embedding_bytes_total\{transport="(\w+)"\} ([0-9.eE+-]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, flags=re.MULTILINE)}


# ---- failures and fallbacks -------------------------------------------------------------------


@process_fixture
def lone_vision(tiny_models, log_dir):
    """A vision server of its own (these tests restart it): the first binds a free port, each
    restart the same one, once the server before it has released it."""
    servers: list[ServerProcess] = []
    targets: list[str] = []

    def start(*extra: str) -> str:
        name, args = f"lone-vision-{len(servers)}", ["--max-batch-tiles", "4", *extra]
        if servers:
            server = restart_vision_server(
                servers[-1], name, tiny_models["hf"], targets[0], log_dir, args
            )
        else:
            server, target = start_vision_server(name, tiny_models["hf"], log_dir, args)
            targets.append(target)
        servers.append(server)
        return targets[0]

    start.servers = servers  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.stop()


def test_without_shared_memory_on_the_vision_side_embeddings_are_streamed(lone_vision):
    target = lone_vision("--no-shared-memory")
    options = EncodeOptions(max_tiles=2)

    async def run() -> None:
        auto = _encoder(target, "auto")
        required = _encoder(target, "shared-memory")
        try:
            before = _bytes_received("grpc")
            results = (await auto.encode(EncodeCall(IMAGES[:1], (), options, "fallback"))).images
            assert _bytes_received("grpc") - before == results[0].embeddings.numel() * 4
            # The probe went unanswered: nothing was ever reserved.
            assert not auto.shared_memory_proven and auto.arena is None
            with pytest.raises(VisionUnavailable, match="instead of writing them to shared"):
                await required.encode(EncodeCall(IMAGES[:1], (), options, "required"))
            # The failed call's range came back at once: nothing can write into it any more.
            assert required.arena is not None
            assert required.arena.free_bytes == required.arena.size
        finally:
            await auto.close()
            await required.close()

    asyncio.run(run())


def test_a_segment_on_another_host_falls_back_to_streaming(flash_vision, monkeypatch):
    """A receiver on another host names a segment this host does not have: the vision service
    streams instead, and the request succeeds."""
    target, _ = flash_vision["hf"]

    async def run() -> list[torch.Tensor]:
        encoder = _encoder(target, "auto")
        await encoder._check_model(60)  # the vision service proves it sees our /dev/shm
        assert encoder.shared_memory_proven and encoder.arena is not None
        real_name = encoder.arena.segment.name
        monkeypatch.setattr(encoder.arena.segment, "name", real_name[:-8] + "00000000")
        before = _bytes_received("grpc")
        try:
            call = EncodeCall(IMAGES[:1], (), EncodeOptions(max_tiles=2), "elsewhere")
            results = (await encoder.encode(call)).images
        finally:
            monkeypatch.setattr(encoder.arena.segment, "name", real_name)
            await encoder.close()
        assert _bytes_received("grpc") - before > 0
        return [r.embeddings for r in results]

    (rows,) = asyncio.run(run())
    assert rows.shape[1] == 128


def test_vision_restart_while_ranges_are_held(lone_vision):
    """The vision service dies in the middle of a call: the call fails with a 503, its range
    comes back at once (a dead writer holds no lock), and the next call after the restart
    uses shared memory."""
    target = lone_vision()
    server = lone_vision.servers[-1]  # type: ignore[attr-defined]
    # Other files of one picture: the embedding cache would answer copies of one file at once.
    many = [
        ImageInput(same_pixels_other_file(IMAGES[0].data, f"restart-{k}"), max_tiles=12)
        for k in range(8)
    ]

    async def run() -> None:
        encoder = _encoder(target, "shared-memory")
        assert encoder.arena is not None
        try:
            await encoder.encode(EncodeCall(IMAGES[:1], request_id="warm-up"))
            written = _bytes_received("shared_memory")
            call = asyncio.ensure_future(encoder.encode(EncodeCall(many, request_id="interrupted")))
            # Killed once the vision service has written the first of the 8 images into our
            # range and told us: in the middle of the call, the range held, 7 images to come.
            deadline = time.monotonic() + 60
            while _bytes_received("shared_memory") == written:
                assert not call.done(), "the call ended before any image was written"
                assert time.monotonic() < deadline, "no image of the call was written"
                await asyncio.sleep(0.005)
            assert not call.done()
            server.proc.send_signal(signal.SIGKILL)
            with pytest.raises(VisionUnavailable):  # so it was killed before the call's end
                await asyncio.wait_for(call, 60)
            assert encoder.arena.free_bytes == encoder.arena.size
            await asyncio.to_thread(lone_vision)
            before = _bytes_received("shared_memory")
            deadline = time.monotonic() + 15
            while True:  # the channel reconnects with a backoff of up to 2 s
                try:
                    await encoder.encode(EncodeCall(IMAGES[:1], request_id="after-restart"))
                    break
                except VisionUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            assert _bytes_received("shared_memory") > before
            # Failed attempts while reconnecting gave their ranges back too.
            assert encoder.arena.free_bytes == encoder.arena.size
        finally:
            await encoder.close()

    asyncio.run(run())


_RECEIVER = """
import asyncio, io, sys, uuid
from PIL import Image, PngImagePlugin
from llm_server.vision.grpc_client import GrpcVisualEncoder
from protos.messages import EncodeCall, ImageInput

def fresh(data, tag):  # another file of the same picture: never an embedding-cache hit
    info = PngImagePlugin.PngInfo()
    info.add_text("dvd-test", tag)
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "PNG", pnginfo=info)
    return out.getvalue()

async def main():
    encoder = GrpcVisualEncoder(sys.argv[1], timeout_s=60, expected_hidden_size=128,
                               transport="shared-memory", shared_memory_bytes=64 << 20)
    data, run = open(sys.argv[2], "rb").read(), uuid.uuid4().hex
    print(encoder.arena.segment.name, flush=True)
    number = 0
    while True:
        number += 1
        images = [ImageInput(fresh(data, f"{run}-{number}-{k}"), max_tiles=12) for k in range(4)]
        print(f"started {number}", flush=True)
        await encoder.encode(EncodeCall(images, request_id=f"killed-receiver-{number}"))
        print(f"done {number}", flush=True)

asyncio.run(main())
"""


def test_a_receiver_killed_mid_call_leaks_nothing(flash_vision, tmp_path):
    target, _ = flash_vision["hf"]
    image = tmp_path / "image.png"
    image.write_bytes(IMAGES[0].data)
    receiver = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER, target, str(image)],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert receiver.stdout is not None
        name = receiver.stdout.readline().decode().strip()
        segment = Path("/dev/shm") / name
        assert segment.exists()
        # One call went through (rows written into the segment); the kill lands as soon as
        # the second has started, which has 4 images of 13 tiles to encode.
        progress = [receiver.stdout.readline() for _ in range(3)]
        assert progress == [b"started 1\n", b"done 1\n", b"started 2\n"], progress
        receiver.send_signal(signal.SIGKILL)
        receiver.wait(10)
        # Killed in the middle of its second call: it never finished it.
        assert b"done 2" not in receiver.stdout.read()
    finally:
        if receiver.poll() is None:
            receiver.kill()
    assert segment.exists()  # SIGKILL: nobody unlinked it...
    arena = EmbeddingArena(1 << 20)  # ...until the next receiver on this host starts
    try:
        assert not segment.exists()
    finally:
        arena.close()
    # The vision service noticed nothing worse than a cancelled call.
    assert asyncio.run(_encode(target, "shared-memory", EncodeOptions(max_tiles=2)))


# ---- the segment format and the arena ---------------------------------------------------------


def test_writer_refuses_wrong_tokens_names_and_ranges():
    segment = shm.OwnedSegment(1 << 20)
    writer = shm.SegmentWriter()
    try:
        assert segment.set_generation(0, 1 << 20, 7)
        writer.check(segment.name, segment.token, 0, 1 << 20, 7)
        with pytest.raises(shm.SharedMemoryError, match="token"):
            writer.check(segment.name, bytes(16), 0, 1024, 7)
        with pytest.raises(shm.SharedMemoryError, match="outside"):
            writer.check(segment.name, segment.token, 1 << 19, 1 << 20, 7)
        with pytest.raises(shm.SharedMemoryError, match="generation"):
            writer.check(segment.name, segment.token, 0, 1024, 0)
        for name in ("../etc/passwd", "dvd-emb-1-2-zz", "dvd-emb-" + "A" * 32, "other"):
            with pytest.raises(shm.SharedMemoryError, match="not an embedding segment name"):
                writer.check(name, segment.token, 0, 1, 7)
        payload = torch.arange(256, dtype=torch.uint8)
        writer.write(segment.name, 4096, payload, 7)
        assert torch.equal(segment.rows(4096, 256), payload)
        with pytest.raises(shm.StaleRange):
            writer.write(segment.name, 4096, payload, 8)
    finally:
        writer.close()
        segment.close()
    assert not (Path("/dev/shm") / segment.name).exists()


def test_writer_unmaps_segments_their_owner_unlinked():
    writer = shm.SegmentWriter()
    first, second = shm.OwnedSegment(1 << 16), shm.OwnedSegment(1 << 16)
    try:
        writer.check(first.name, first.token, 0, 1, 1)
        first.close()  # its owner is gone
        writer.check(second.name, second.token, 0, 1, 1)
        assert writer.open_segments == [second.name]
    finally:
        writer.close()
        second.close()


def test_arena_reserves_first_fit_and_merges_on_release():
    arena = EmbeddingArena(1 << 20)  # 16 ranges of 64 KiB
    try:
        a = arena.reserve(1)
        b = arena.reserve(100_000)  # two ranges
        c = arena.reserve(64 * 1024)
        assert a is not None and b is not None and c is not None
        assert (a.offset, b.offset, c.offset) == (0, 64 * 1024, 3 * 64 * 1024)
        assert arena.reserve(1 << 20) is None  # not enough left in one piece
        arena.release(b)
        d = arena.reserve(64 * 1024)
        assert d is not None and d.offset == 64 * 1024  # first fit reuses the hole
        for reservation in (a, c, d):
            arena.release(reservation)
        assert arena._free == [(0, arena.size)]  # merged back into one range
        assert arena.reserve(arena.size) is not None
    finally:
        arena.close()


@pytest.mark.processes  # the benchmark runs a vision server
def test_transport_benchmark_measures_both_paths(tmp_path):
    """The benchmark runs end to end (stand-in server and client processes) and reports
    every configuration it was asked for, with the sizes it was asked for."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.transport", "--sizes-mb", "0.01", "0.5"]
        + ["--streams", "1", "2", "--calls", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)
    configs = {(r["transport"], round(r["size_mb"], 2), r["streams"]) for r in results}
    assert configs == {
        (t, mb, n) for t in ("grpc", "shared-memory") for mb in (0.01, 0.5) for n in (1, 2)
    }
    for r in results:
        assert r["calls"] == 2 * r["streams"]
        assert 0 < r["call_ms_p50"] <= r["call_ms_p99"]
        assert r["aggregate_gb_per_s"] > 0

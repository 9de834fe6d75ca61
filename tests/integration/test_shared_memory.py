"""The same-host transport under hostile or unlucky conditions: files planted under our names,
segments truncated or sparse, caches evicted during a copy, writes that arrive after their
call ended, receivers restarted in a new pid namespace, and vision services that cannot see
the receiver's /dev/shm. No model runs; stand-in vision services listen on 127.0.0.1.

Nothing here sleeps to wait for something: a copy in progress is held at a barrier.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from llm_server.vision.arena import EmbeddingArena
from llm_server.vision.grpc_client import GrpcVisualEncoder
from protos import codec, shm
from protos.dvd.v1 import vision_pb2
from protos.messages import EncodeCall, ImageInput
from vision_server.delivery import SharedMemoryDelivery, probe_nonce
from vision_server.service import image_messages

pytestmark = [
    pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory here"),
    pytest.mark.timeout(60),
]

HIDDEN = 64
WAIT_S = 10  # bound on every wait for another thread or process


def _planted_name() -> str:
    return f"{shm.SEGMENT_PREFIX}{secrets.token_hex(16)}"


@pytest.fixture
def planted() -> Iterator[Callable[[str], Path]]:
    """Plants things in /dev/shm under names a segment could have; removes them after."""
    paths: list[Path] = []

    def plant(kind: str) -> Path:
        path = shm.SHM_DIR / _planted_name()
        paths.append(path)
        if kind == "directory":
            path.mkdir()
            (path / "inside").write_bytes(b"x")
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "symlink":
            victim = shm.SHM_DIR / f"dvd-test-victim-{secrets.token_hex(8)}"
            paths.append(victim)
            victim.write_bytes(b"victim")
            path.symlink_to(victim)
        elif kind == "other-user":
            path.write_bytes(bytes(shm.PAGE_BYTES))
            os.chown(path, 4242, 4242)
        else:
            raise ValueError(kind)
        return path

    yield plant
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            (path / "inside").unlink(missing_ok=True)
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


KINDS = ["directory", "fifo", "symlink"] + (["other-user"] if os.geteuid() == 0 else [])


# ---- start-up: planted files and leftovers ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_file_or_directory_does_not_stop_the_receiver(planted, kind):
    path = planted(kind)
    target = path.resolve() if kind == "symlink" else None
    assert path.name not in shm.reclaim_orphans()  # not ours: left alone
    arena = EmbeddingArena(1 << 20)  # starts all the same
    try:
        assert os.path.lexists(path)
        if target is not None:
            assert target.read_bytes() == b"victim"  # the link was not followed
    finally:
        arena.close()


def test_a_planted_name_is_skipped_when_creating(planted, monkeypatch):
    """A file sitting under the name drawn for a new segment: another name is drawn."""
    path = planted("directory")
    drawn = iter([path.name.removeprefix(shm.SEGMENT_PREFIX), secrets.token_hex(16)])
    monkeypatch.setattr(shm.secrets, "token_hex", lambda _: next(drawn))
    segment = shm.OwnedSegment(shm.SLOT_BYTES)
    try:
        assert segment.name != path.name and path.is_dir()
    finally:
        segment.close()


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.posix_fallocate(fd, 0, 4096)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def _holder(path: Path) -> subprocess.Popen[bytes]:
    """A process standing for a receiver (of any pid namespace) that holds ``path``'s lock."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None and process.stdout.readline() == b"locked\n"
    return process


def test_a_restarted_receiver_reclaims_what_no_live_process_holds():
    """Liveness is the lock, not a pid: a segment left by a killed receiver (whatever its pid
    namespace) is unlinked at the next start, one a live receiver holds is kept."""
    dead, alive = shm.SHM_DIR / _planted_name(), shm.SHM_DIR / _planted_name()
    killed, holder = _holder(dead), _holder(alive)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(WAIT_S)
        removed = shm.reclaim_orphans()
        assert dead.name in removed and not dead.exists()
        assert alive.name not in removed and alive.exists()
        assert holder.stdin is not None
        holder.stdin.close()  # the receiver exits: its lock goes with it
        holder.wait(WAIT_S)
        assert alive.name in shm.reclaim_orphans() and not alive.exists()
    finally:
        for process in (killed, holder):
            if process.poll() is None:
                process.kill()
                process.wait(WAIT_S)
        dead.unlink(missing_ok=True)
        alive.unlink(missing_ok=True)


def test_a_live_segment_of_this_process_is_never_reclaimed():
    segment = shm.OwnedSegment(shm.SLOT_BYTES)
    try:
        assert segment.name not in shm.reclaim_orphans()
        assert (shm.SHM_DIR / segment.name).exists()
    finally:
        segment.close()


# ---- the writer refuses segments it could crash on --------------------------------------------


def _target(segment: shm.OwnedSegment, size: int, generation: int) -> vision_pb2.EncodeRequest:
    return vision_pb2.EncodeRequest(
        shared_memory=vision_pb2.SharedMemoryTarget(
            segment=segment.name,
            token=segment.token,
            offset=0,
            capacity=size,
            generation=generation,
        )
    )


@pytest.mark.parametrize("kind", KINDS)
def test_the_writer_refuses_planted_files(planted, kind):
    path = planted(kind)
    writer = shm.SegmentWriter()
    try:
        with pytest.raises(shm.SharedMemoryError):
            writer.check(path.name, bytes(16), 0, 1, 1)
        assert probe_nonce(writer, path.name) == b""
    finally:
        writer.close()


def test_a_truncated_segment_is_refused_before_and_after_it_is_mapped():
    """A page past the end of the file is a SIGBUS: the size is checked when the segment is
    opened and again before every write."""
    segment = shm.OwnedSegment(4 * shm.SLOT_BYTES)
    other = shm.OwnedSegment(4 * shm.SLOT_BYTES)
    writer = shm.SegmentWriter()
    path = shm.SHM_DIR / segment.name
    try:
        assert segment.set_generation(0, 4 * shm.SLOT_BYTES, 1)
        delivery = SharedMemoryDelivery.open(writer, _target(segment, 4 * shm.SLOT_BYTES, 1), "t")
        assert delivery is not None
        os.truncate(path, path.stat().st_size - shm.SLOT_BYTES)  # after the check
        rows = torch.ones(2 * shm.SLOT_BYTES // 4, dtype=torch.float32)
        assert asyncio.run(delivery.write(rows)) is None  # streamed instead, no SIGBUS
        # Opened afresh (the cache evicted), it is refused at once.
        writer.close()
        request = _target(segment, shm.SLOT_BYTES, 1)
        assert SharedMemoryDelivery.open(writer, request, "t") is None
        with pytest.raises(shm.SharedMemoryError, match="its header says"):
            writer.check(segment.name, segment.token, 0, 1, 1)
        assert other.set_generation(0, shm.SLOT_BYTES, 1)  # the others still work
        writer.write(other.name, 0, torch.ones(16, dtype=torch.uint8), 1)
    finally:
        writer.close()
        segment.close()
        other.close()


def test_a_sparse_segment_is_refused():
    """A segment whose pages are not all allocated (made with ftruncate, not fallocate): a
    write into a hole of a full tmpfs is a SIGBUS."""
    segment = shm.OwnedSegment(4 * shm.SLOT_BYTES)
    sparse = shm.SHM_DIR / _planted_name()
    writer = shm.SegmentWriter()
    try:
        real = shm.SHM_DIR / segment.name
        with real.open("rb") as source:
            header = source.read(shm.HEADER_BYTES)
        sparse.write_bytes(header)
        os.truncate(sparse, real.stat().st_size)  # the right size, mostly holes
        with pytest.raises(shm.SharedMemoryError, match="sparse"):
            writer.check(sparse.name, segment.token, 0, 1, 1)
        assert writer.open_segments == []
    finally:
        writer.close()
        segment.close()
        sparse.unlink(missing_ok=True)


# ---- copies in progress: eviction, release and reuse ------------------------------------------


class HeldCopy:
    """Makes the writer's next copies stop at a barrier until ``finish``: a copy in progress
    that the test can act around, without sleeping."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        copy = codec.copy_bytes

        def held(target: torch.Tensor, source: torch.Tensor) -> None:
            self.started.set()
            assert self.go.wait(WAIT_S)
            copy(target, source)

        monkeypatch.setattr(shm.codec, "copy_bytes", held)
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None

    def start(self, write: Callable[[], None]) -> None:
        def run() -> None:
            try:
                write()
            except BaseException as exc:  # reported by finish
                self.errors.append(exc)

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.started.wait(WAIT_S)

    def finish(self) -> None:
        self.go.set()
        assert self.thread is not None
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]


def test_eviction_during_a_copy_waits_for_it(monkeypatch):
    """The writer's cache evicts a segment while a worker thread is copying into it: the
    mapping stays until the copy is done, then goes."""
    first, second = shm.OwnedSegment(shm.SLOT_BYTES), shm.OwnedSegment(shm.SLOT_BYTES)
    writer = shm.SegmentWriter(max_open=1)
    held = HeldCopy(monkeypatch)
    payload = torch.arange(4096, dtype=torch.int32).view(torch.uint8)
    try:
        for segment in (first, second):
            assert segment.set_generation(0, shm.SLOT_BYTES, 3)
        writer.check(first.name, first.token, 0, shm.SLOT_BYTES, 3)
        mapped = writer._open[first.name]
        held.start(lambda: writer.write(first.name, 0, payload, 3))
        writer.check(second.name, second.token, 0, shm.SLOT_BYTES, 3)  # evicts the first
        writer.close()
        assert writer.open_segments == [] and not mapped._map.closed  # still copying
        held.finish()
        assert mapped._map.closed
        assert torch.equal(first.rows(0, payload.numel()), payload)
    finally:
        held.go.set()
        writer.close()
        first.close()
        second.close()


def test_a_late_write_cannot_land_in_a_reused_range():
    """A call ends (its vision service still busy), its range is released and reserved by
    another call: the first call's write is refused, the second call's rows are untouched."""
    arena = EmbeddingArena(4 * shm.SLOT_BYTES)
    writer = shm.SegmentWriter()
    try:
        first = arena.reserve(4 * shm.SLOT_BYTES)
        assert first is not None
        request = _target(arena.segment, first.size, first.generation)
        late = SharedMemoryDelivery.open(writer, request, "late")
        assert late is not None
        arena.release(first)
        second = arena.reserve(shm.SLOT_BYTES)
        assert second is not None and second.offset == first.offset
        assert second.generation != first.generation
        mine = torch.full((shm.SLOT_BYTES,), 7, dtype=torch.uint8)
        writer.write(arena.segment.name, second.offset, mine, second.generation)
        assert asyncio.run(late.write(torch.zeros(256, dtype=torch.float32))) is None
        with pytest.raises(shm.StaleRange):
            writer.write(arena.segment.name, first.offset, mine * 0, first.generation)
        assert torch.equal(arena.rows(second, 0, shm.SLOT_BYTES), mine)
        assert arena.holds(second) and not arena.holds(first)
    finally:
        writer.close()
        arena.close()


def test_a_range_being_written_is_held_back_until_the_copy_ends(monkeypatch):
    """The call ends while the vision service is copying into its range: the range cannot be
    released (the copy holds its slots), so no other call gets it until the copy is done."""
    arena = EmbeddingArena(2 * shm.SLOT_BYTES)
    writer = shm.SegmentWriter()
    held = HeldCopy(monkeypatch)
    try:
        busy = arena.reserve(shm.SLOT_BYTES)
        assert busy is not None
        payload = torch.ones(1024, dtype=torch.uint8)
        segment = arena.segment
        writer.check(segment.name, segment.token, busy.offset, busy.size, busy.generation)
        held.start(lambda: writer.write(arena.segment.name, busy.offset, payload, busy.generation))
        arena.release(busy)
        assert arena.held_back == [busy] and arena.holds(busy)
        other = arena.reserve(shm.SLOT_BYTES)
        assert other is not None and other.offset != busy.offset
        assert arena.reserve(shm.SLOT_BYTES) is None  # the busy range is not handed out
        held.finish()
        arena.release(other)
        arena.release_held_back()
        assert arena.held_back == [] and arena.free_bytes == arena.size
    finally:
        held.go.set()
        writer.close()
        arena.close()


def test_concurrent_writes_from_many_threads():
    """Writes from many threads into ranges of one segment, with the cache evicting all the
    while: every byte lands where it belongs, and nothing crashes."""
    arena = EmbeddingArena(16 * shm.SLOT_BYTES)
    others = [shm.OwnedSegment(shm.SLOT_BYTES) for _ in range(3)]
    writer = shm.SegmentWriter(max_open=2)
    reservations = [arena.reserve(shm.SLOT_BYTES) for _ in range(16)]
    errors: list[BaseException] = []
    try:

        def write(index: int) -> None:
            reservation = reservations[index]
            assert reservation is not None
            payload = torch.full((shm.SLOT_BYTES,), index, dtype=torch.uint8)
            other = others[index % len(others)]
            try:
                for _ in range(20):
                    writer.write(
                        arena.segment.name, reservation.offset, payload, reservation.generation
                    )
                    try:  # no reservation there: refused, and the other segment evicted
                        writer.write(other.name, 0, payload[:16], 1)
                        errors.append(AssertionError("wrote into a range nobody reserved"))
                    except shm.StaleRange:
                        pass
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(index,)) for index in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        for index, reservation in enumerate(reservations):
            assert reservation is not None
            rows = arena.rows(reservation, 0, shm.SLOT_BYTES)
            assert torch.equal(rows, torch.full_like(rows, index))
    finally:
        writer.close()
        arena.close()
        for other in others:
            other.close()


# ---- the proof: shared memory only where the vision service sees it ---------------------------


class StandInVision:
    """A vision service on 127.0.0.1 that answers every Encode with one image of fixed rows,
    through the vision service's own delivery code, and its probes through ``writer``."""

    def __init__(self, writer: shm.SegmentWriter) -> None:
        self.writer = writer
        self.rows = torch.randn(16, HIDDEN)
        self.requests: list[vision_pb2.EncodeRequest] = []
        self.probes: list[str] = []
        self.server: grpc.aio.Server | None = None
        self.target = ""

    async def _encode(
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        self.requests.append(request)
        rows = self.rows.shape[0]
        header = vision_pb2.EncodeResponse(
            header=vision_pb2.ImageHeader(
                image_index=0,
                num_tiles=1,
                tokens_per_tile=[rows],
                num_visual_tokens=rows,
                hidden_size=HIDDEN,
                dtype=vision_pb2.DTYPE_FLOAT32,
                num_bytes=self.rows.numel() * 4,
            )
        )
        delivery = SharedMemoryDelivery.open(self.writer, request, request.request_id)
        async for message in image_messages(header, self.rows, delivery, 4096):
            yield message

    async def _model_info(
        self, request: vision_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.ModelInfo:
        self.probes.append(request.shared_memory_probe)
        return vision_pb2.ModelInfo(
            model_id="stand-in",
            hidden_size=HIDDEN,
            dtype=vision_pb2.DTYPE_FLOAT32,
            tokens_per_tile=16,
            default_max_tiles=1,
            shared_memory_nonce=probe_nonce(self.writer, request.shared_memory_probe),
        )

    async def __aenter__(self) -> StandInVision:
        self.server = grpc.aio.server()
        handlers = {
            "Encode": grpc.unary_stream_rpc_method_handler(
                self._encode,
                request_deserializer=vision_pb2.EncodeRequest.FromString,
                response_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self._model_info,
                request_deserializer=vision_pb2.GetModelInfoRequest.FromString,
                response_serializer=vision_pb2.ModelInfo.SerializeToString,
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("dvd.v1.VisionService", handlers),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.target = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        await self.server.stop(0)


def _no_probe_left(vision: StandInVision) -> bool:
    return bool(vision.probes) and not any((shm.SHM_DIR / p).exists() for p in vision.probes)


async def _encode_twice(vision: StandInVision) -> tuple[GrpcVisualEncoder, list[torch.Tensor]]:
    encoder = GrpcVisualEncoder(
        vision.target, timeout_s=WAIT_S, expected_hidden_size=HIDDEN, shared_memory_bytes=4 << 20
    )
    image = [ImageInput(b"not decoded by the stand-in")]
    results = []
    for _ in range(2):
        (result,) = (await encoder.encode(EncodeCall(image, request_id="probe-test"))).images
        results.append(result.embeddings)
    return encoder, results


def test_a_vision_service_on_another_host_is_offered_no_shared_memory(tmp_path):
    """A vision service whose /dev/shm is not ours (here: a directory of its own, as on
    another host or in another pod) cannot read the probe: no arena is created, no segment
    is named in any call, and the rows are streamed."""

    async def run() -> None:
        async with StandInVision(shm.SegmentWriter(directory=tmp_path)) as vision:
            encoder, results = await _encode_twice(vision)
            try:
                assert not encoder.shared_memory_proven and encoder.arena is None
                assert all(not r.HasField("shared_memory") for r in vision.requests)
                assert all(torch.equal(rows, vision.rows) for rows in results)
                assert _no_probe_left(vision) and all(vision.probes)
            finally:
                await encoder.close()

    asyncio.run(run())


def test_a_vision_service_on_this_host_proves_it_and_gets_shared_memory():
    async def run() -> None:
        async with StandInVision(shm.SegmentWriter()) as vision:
            encoder, results = await _encode_twice(vision)
            assert encoder.arena is not None
            segment = shm.SHM_DIR / encoder.arena.segment.name
            try:
                assert encoder.shared_memory_proven and segment.exists()
                assert _no_probe_left(vision)
                assert all(r.HasField("shared_memory") for r in vision.requests)
                generations = [r.shared_memory.generation for r in vision.requests]
                assert 0 < generations[0] < generations[1]
                assert all(torch.equal(rows, vision.rows) for rows in results)
                assert encoder.arena.free_bytes == encoder.arena.size
            finally:
                await encoder.close()
                vision.writer.close()
            assert not segment.exists()

    asyncio.run(run())


def test_grpc_transport_never_probes():
    async def run() -> None:
        async with StandInVision(shm.SegmentWriter()) as vision:
            encoder = GrpcVisualEncoder(
                vision.target, timeout_s=WAIT_S, expected_hidden_size=HIDDEN, transport="grpc"
            )
            try:
                await encoder.encode(EncodeCall([ImageInput(b"x")], request_id="grpc"))
                assert encoder.arena is None and not encoder.shared_memory_proven
                assert vision.probes == [""]
                assert not vision.requests[0].HasField("shared_memory")
            finally:
                await encoder.close()
                vision.writer.close()

    asyncio.run(run())

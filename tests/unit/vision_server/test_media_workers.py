"""Untrusted media: every image and video is decoded and tiled in a worker process
(``vision_server/media_workers.py``) that is bounded (address space, CPU time per item, wall
time, a video's decoded pixels) and cancellable, and whose crash fails only the item it had.

The hostile corpus is generated (``hostile_media.py``): for each accepted image format a small
file whose decoding needs more memory than a worker has; truncated and corrupt files; videos
whose codec no decoder knows, in each accepted container; a long video within every header
limit whose decoding exceeds the budget (a key frame and thousands of skipped frames, a few
hundred KB); frames that grow mid-stream. The pool is driven in process where timings and
the worker of a task must be exact (a hook names the worker a task went to); the rest talks
to a real ``dvd-vision-server`` over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from helpers import (
    REPO_ROOT,
    ServerProcess,
    encode_image,
    encode_over_grpc,
    encode_video,
    grey_level_frames,
    mixed_frames,
    noise_image,
    process_fixture,
    start_vision_server,
)
from hostile_media import (
    IMAGE_FORMATS,
    corrupt,
    growing_frames_video,
    image_bomb,
    repeated_frames_video,
    truncated,
    unknown_codec,
)

from protos.dvd.v1 import vision_pb2, vision_pb2_grpc
from vision_server import media_protocol as wire
from vision_server.engine import TileParts
from vision_server.errors import InvalidImage, InvalidVideo, MediaWorkersUnavailable
from vision_server.media_workers import MediaWorkerConfig, MediaWorkerPool
from vision_server.preprocess import ImageLimits, PreparedImage, TilingOptions, prepare_image
from vision_server.video import VideoLimits, prepare_video

MIB = 1024 * 1024
WORKER_MEMORY = 512 * MIB  # the pool's and the server's: room for a few 12-tile images
BOMB_PIXELS = 200_000_000  # past every bomb: the memory limit must stop them, not the header
IMAGE = encode_image(noise_image(900, 600, seed=7))  # 6 tiles + thumbnail
SMALL = encode_image(noise_image(300, 200, seed=8))
ONE_TILE = TilingOptions(max_tiles=1)


@pytest.fixture(scope="module")
def long_video() -> bytes:
    """3000 frames of 3840x2160 (100 s, 30 fps) in about 120 KB: every header limit holds,
    and decoding it all takes tens of seconds."""
    return repeated_frames_video(3840, 2160, 3000)


def pool_config(**changes: object) -> MediaWorkerConfig:
    config = MediaWorkerConfig(
        workers=2,
        memory_bytes=WORKER_MEMORY,
        item_cpu_s=60,
        item_timeout_s=60,
        image_limits=ImageLimits(max_pixels=BOMB_PIXELS),
        video_limits=VideoLimits(max_decode_s=60),
        max_image_tiles=13,
        max_frames=64,
        tile_size=448,
    )
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pool() -> Iterator[MediaWorkerPool]:
    pool = MediaWorkerPool(pool_config())
    yield pool
    pool.close()


@pytest.fixture
def sent_to(pool: MediaWorkerPool) -> Iterator[Callable[[float], int]]:
    """``sent_to(timeout)``: the pid of the worker that the next task goes to, once sent."""
    pids: list[int] = []
    sent = threading.Event()

    def on_sent(pid: int) -> None:
        pids.append(pid)
        sent.set()

    def next_pid(timeout: float) -> int:
        assert sent.wait(timeout), "no task was sent"
        sent.clear()
        return pids[-1]

    pool.task_sent = on_sent
    yield next_pid
    pool.task_sent = None


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``condition`` holds (checked every 10 ms); the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (S: waiting, R: running), None once gone or
    a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state in ("Z", "X") else state


def memory_kib(pid: int, field: str) -> int | None:
    """A memory figure of ``pid`` from ``/proc/<pid>/status`` (KiB), None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    found = [int(line.split()[1]) for line in lines if line.startswith(f"{field}:")]
    return found[0] if found else None


def kill_idle_worker(pool: MediaWorkerPool) -> None:
    """Kill the one worker of ``pool`` while it waits for a task; return once it is gone."""
    pool.slots[0].kill()
    wait_for(lambda: not pool.worker_pids(), 10, "the worker gone")


def run(coroutine: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
    """Run one scenario on a fresh event loop, bounded in time."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


# ---- the wire: records and what the server accepts ---------------------------------------------

MESSAGES = [
    wire.Ready(1234, wire.NETWORK_ISOLATED),
    wire.Plan(7, 900, 600, 3, 2, True, 448),
    wire.Tiles(7, 0, 6, wire.DTYPE_UINT8, 3, 448, 448),
    wire.VideoInfo(8, 320, 240, 30, 3.0, 10.0),
    wire.Done(7, 7),
    wire.Failed(9, "cannot decode image: é and \x00"),
    wire.Cancelled(10),
]


def test_records_read_back_whatever_pieces_they_come_in():
    stream = b"".join(wire.encode_message(message) for message in MESSAGES)
    reader = wire.MessageReader()
    read: list[wire.Message] = []
    for position in range(0, len(stream), 7):  # 7-byte pieces: every record split somewhere
        read += reader.feed(stream[position : position + 7])
    assert read == MESSAGES


@pytest.mark.parametrize(
    "raw",
    [
        b"XXXX" + bytes(56),  # not our magic
        wire.encode_message(wire.Done(1, 1))[:4] + b"\x09" + bytes(55),  # another version
        wire.encode_message(wire.Done(1, 1)).replace(b"DVDw\x01\x05", b"DVDw\x01\x63", 1),
    ],
    ids=["magic", "version", "kind"],
)
def test_malformed_records_are_refused(raw):
    with pytest.raises(wire.ProtocolError):
        wire.MessageReader().feed(raw)


def test_text_longer_than_its_bound_is_refused_before_it_is_read():
    record = bytearray(wire.encode_message(wire.Failed(3, "x")))
    record[12:16] = (wire.MAX_TEXT_BYTES + 1).to_bytes(4, "little")
    with pytest.raises(wire.ProtocolError, match="bytes of text"):
        wire.MessageReader().feed(bytes(record))


ROGUE_MODES = [
    "bad-grid",
    "tiles-out-of-range",
    "wrong-shape",
    "done-early",
    "other-task",
    "garbage",
    "huge-text",
    "silent",
]


@pytest.mark.parametrize("mode", ROGUE_MODES)
def test_a_compromised_worker_gets_nothing_past_the_checks(mode):
    """A worker that answers out of protocol (a grid the image cannot have, tiles outside
    what was asked, another shape, too early, for another task, garbage, a gigabyte of text,
    nothing at all): its item fails as an invalid image, and the worker is replaced."""
    pool = MediaWorkerPool(pool_config(workers=1, item_timeout_s=2))
    try:
        pool.command = [
            sys.executable,
            str(REPO_ROOT / "tests" / "support" / "rogue_media_worker.py"),
            mode,
        ]
        first = pool.worker_pids()
        kill_idle_worker(pool)  # the next item meets a rogue worker, started in its place
        with pytest.raises(InvalidImage) as refused:
            run(pool.prepare_image(SMALL, ONE_TILE), timeout=30)
        expected = "took more than 2 s" if mode == "silent" else "answered out of protocol"
        assert expected in str(refused.value)
        wait_for(lambda: pool.worker_pids() not in ([], first), 30, "a new worker")
    finally:
        pool.close()


def test_a_worker_cannot_shrink_the_block_under_the_server():
    """The block is sealed at its size: a worker that tries to cut it short (so that the
    server's reads would fault) fails, and its otherwise valid answer is taken."""
    pool = MediaWorkerPool(pool_config(workers=1))
    try:
        rogue = [sys.executable, str(REPO_ROOT / "tests" / "support" / "rogue_media_worker.py")]
        pool.command = [*rogue, "shrink-block"]
        kill_idle_worker(pool)
        prepared = run(pool.prepare_image(SMALL, ONE_TILE), timeout=30)
        assert isinstance(prepared, PreparedImage) and prepared.num_tiles == 1
        assert os.fstat(pool.slots[0].memfd).st_size == pool.config.layout.size
    finally:
        pool.close()


# ---- what a worker can reach ----------------------------------------------------------------

NAMESPACE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x40000000 | 0x00020000) != 0:  # user, network, mount
    sys.exit(1)
sys.exit(0 if libc.mount(b"none", b"/", None, (1 << 14) | (1 << 18), None) == 0 else 1)
"""


def kernel_allows_namespaces() -> bool:
    """Whether an unprivileged process may make user, network and mount namespaces here."""
    return subprocess.run([sys.executable, "-c", NAMESPACE_PROBE], check=False).returncode == 0


def test_a_worker_sees_neither_the_network_nor_the_servers_shared_memory(pool):
    """Where the kernel allows it, a worker has no interface but its own loopback and an
    empty /dev/shm of its own: a segment the server can see is not there for the worker."""
    if not kernel_allows_namespaces():
        pytest.skip("this kernel lets no unprivileged process make namespaces")
    run(pool.prepare_image(IMAGE, TilingOptions(max_tiles=1)))  # the workers are up
    planted = Path("/dev/shm") / f"dvd-test-visible-{os.getpid()}"
    planted.write_bytes(b"secret")
    try:
        pids = pool.worker_pids()
        assert len(pids) == pool.config.workers
        for pid in pids:
            root = Path(f"/proc/{pid}/root")
            assert planted.name not in os.listdir(root / "dev/shm"), pid
            with pytest.raises(OSError):
                (root / "dev/shm/planted").write_bytes(b"x")  # read-only
            interfaces = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
            assert [line.split(":")[0].strip() for line in interfaces] == ["lo"], interfaces
    finally:
        planted.unlink()


# ---- the pool: the same tiles, in other processes -----------------------------------------------


def test_tiles_are_those_cut_in_process(pool):
    """Images in one piece and in parts, and a video, equal what the in-process functions
    cut, bit for bit."""
    options = TilingOptions(max_tiles=12)
    expected = prepare_image(IMAGE, ImageLimits(), options)
    video = encode_video(mixed_frames(12, seed=3))
    expected_video = prepare_video(video, 5, VideoLimits())

    async def scenario() -> tuple[Any, Any, Any]:
        whole = await pool.prepare_image(IMAGE, options)
        parts = await pool.prepare_image(IMAGE, options, in_parts=True)
        assert isinstance(parts, TileParts)
        cut = torch.cat([await part for part in parts.parts])
        sampled = await pool.prepare_video(video, 5)
        return whole, (parts.grid, cut), sampled

    whole, (grid, cut), sampled = run(scenario())
    assert whole.grid == grid == expected.grid
    assert torch.equal(whole.tiles, expected.tiles)
    assert torch.equal(cut, expected.tiles)
    assert sampled.frame_numbers == expected_video.frame_numbers
    assert sampled.info == expected_video.info
    assert torch.equal(sampled.frames.tiles, expected_video.frames.tiles)


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_an_image_bomb_fails_alone_within_the_worker_memory(pool, sent_to, fmt):
    """A 12000 x 12000 file of a few hundred KB, past the header check here: decoding it
    needs more than the worker's address space. Only that image fails; the worker's peak
    resident memory stays under its limit (when it survived), and the next image is served."""
    bomb = image_bomb(fmt)
    assert len(bomb) < 2 * MIB

    async def scenario() -> tuple[int, float]:
        started = time.monotonic()
        bombed = asyncio.ensure_future(pool.prepare_image(bomb, TilingOptions()))
        pid = await asyncio.to_thread(sent_to, 30)
        with pytest.raises(InvalidImage) as refused:
            await bombed
        assert "cannot decode image" in str(refused.value) or "memory" in str(refused.value)
        return pid, time.monotonic() - started

    pid, seconds = run(scenario())
    assert seconds < pool.config.item_timeout_s
    # The worker may be gone (crashed, or replaced with its address space grown); if not:
    peak = memory_kib(pid, "VmPeak")
    assert peak is None or peak * 1024 <= WORKER_MEMORY
    served = run(pool.prepare_image(SMALL, ONE_TILE))
    assert isinstance(served, PreparedImage) and served.num_tiles == 1


def test_a_cancelled_video_stops_its_worker_within_100_ms(pool, sent_to, long_video):
    """The worker is told (a flag it looks at between frames), or killed past a grace."""

    async def scenario() -> int:
        call = asyncio.ensure_future(pool.prepare_video(long_video, 8))
        pid = await asyncio.to_thread(sent_to, 30)
        base = cpu_seconds(pid)
        await asyncio.to_thread(
            wait_for, lambda: cpu_seconds(pid) > base + 0.1, 30, "the worker decoding"
        )
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return pid

    stops = len(pool.cancel_seconds)
    pid = run(scenario())
    wait_for(lambda: len(pool.cancel_seconds) > stops, 10, "the stop")
    assert pool.cancel_seconds[-1] < 0.1
    # Killed, or back to waiting for its next task (not decoding on).
    wait_for(lambda: process_state(pid) in (None, "S"), 1, "the worker idle")
    assert run(pool.prepare_video(encode_video(grey_level_frames(10)), 2)).num_frames == 2


def test_a_cancelled_image_stops_its_worker_within_100_ms():
    """An image is decoded in one C call that looks at no flag: its worker is killed after
    the grace and replaced."""
    pool = MediaWorkerPool(pool_config(workers=1, memory_bytes=2048 * MIB))
    sent = threading.Event()
    pool.task_sent = lambda pid: sent.set()
    large = image_bomb("PNG")  # 144 M pixels to inflate, convert and resize: over a second

    async def scenario() -> int:
        call = asyncio.ensure_future(pool.prepare_image(large, TilingOptions()))
        await asyncio.to_thread(sent.wait, 30)
        (pid,) = pool.worker_pids()
        base = cpu_seconds(pid)
        await asyncio.to_thread(
            wait_for, lambda: cpu_seconds(pid) > base + 0.05, 30, "the worker decoding"
        )
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return pid

    try:
        pid = run(scenario())
        wait_for(lambda: bool(pool.cancel_seconds), 10, "the stop")
        assert pool.cancel_seconds[-1] < 0.1
        # Killed, or back to waiting for its next task (not decoding on).
        wait_for(lambda: process_state(pid) in (None, "S"), 1, "the worker idle")
        assert run(pool.prepare_image(SMALL, ONE_TILE)).num_tiles == 1
    finally:
        pool.close()


def test_a_worker_killed_mid_decode_fails_only_its_item(pool, sent_to, long_video):
    """SIGSEGV in the worker decoding a video: that video fails (400), the images decoded
    meanwhile by the other worker do not, and the pool starts a new worker."""

    async def scenario() -> tuple[int, list[Any]]:
        video = asyncio.ensure_future(pool.prepare_video(long_video, 8))
        pid = await asyncio.to_thread(sent_to, 30)
        base = cpu_seconds(pid)
        await asyncio.to_thread(wait_for, lambda: cpu_seconds(pid) > base + 0.1, 30, "decoding")
        images = [
            asyncio.ensure_future(pool.prepare_image(IMAGE, TilingOptions())) for _ in range(3)
        ]
        os.kill(pid, signal.SIGSEGV)
        with pytest.raises(InvalidVideo, match=r"the decoder crashed \(SIGSEGV\)"):
            await video
        return pid, list(await asyncio.gather(*images))

    pid, images = run(scenario())
    assert [image.num_tiles for image in images] == [7, 7, 7]
    wait_for(
        lambda: len(pool.worker_pids()) == 2 and pid not in pool.worker_pids(), 30, "a new worker"
    )
    assert run(pool.prepare_video(encode_video(grey_level_frames(10)), 2)).num_frames == 2


def test_a_pool_whose_workers_cannot_start_is_unavailable():
    """No worker can be started (here: its program is gone): items fail with UNAVAILABLE (a
    503, another replica may serve them) rather than wait; once a worker starts again, the
    pool serves."""
    pool = MediaWorkerPool(pool_config(workers=1))
    try:
        command = pool.command
        pool.command = ["/nonexistent/python"]
        kill_idle_worker(pool)
        with pytest.raises(MediaWorkersUnavailable) as refused:
            run(pool.prepare_image(SMALL, ONE_TILE), timeout=30)
        assert refused.value.status == grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: pool.down is not None, 30, "the pool down")
        with pytest.raises(MediaWorkersUnavailable):
            run(pool.prepare_image(SMALL, ONE_TILE), timeout=30)
        pool.command = command
        wait_for(lambda: pool.down is None, 30, "a worker again")
        assert run(pool.prepare_image(SMALL, ONE_TILE)).num_tiles == 1
    finally:
        pool.close()


def test_a_video_holds_one_full_frame_at_a_time():
    """64 frames sampled from a 3840 x 2160 video: each is cut into its tile as soon as it is
    decoded, so the worker's peak grows by about one frame, the decoder's references and the
    64 tiles (~100 MB), not by 64 frames (over 2 GB)."""
    pool = MediaWorkerPool(pool_config(workers=1, memory_bytes=2048 * MIB))
    try:
        (pid,) = pool.worker_pids()
        before = memory_kib(pid, "VmHWM")
        video = repeated_frames_video(3840, 2160, 64)
        sampled = run(pool.prepare_video(video, 64))
        assert sampled.num_frames == 64
        after = memory_kib(pid, "VmHWM")
        assert before is not None and after is not None
        grown_mib = (after - before) / 1024
        assert grown_mib < 250, f"the worker's peak grew by {grown_mib:.0f} MiB"
    finally:
        pool.close()


# ---- budgets, in process -----------------------------------------------------------------------


def test_the_decoded_pixels_budget_stops_a_long_video(long_video):
    limits = VideoLimits(max_decoded_pixels=50 * 3840 * 2160)
    with pytest.raises(InvalidVideo, match="up to frame 50 takes more than"):
        prepare_video(long_video, 8, limits)


def test_the_time_budget_stops_a_long_video(long_video):
    started = time.monotonic()
    with pytest.raises(InvalidVideo, match="took more than 0.5 s, the limit"):
        prepare_video(long_video, 8, VideoLimits(max_decode_s=0.5))
    assert time.monotonic() - started < 5  # the budget, plus one frame and the probe


@pytest.mark.parametrize("fmt", ["avi", "matroska"])
def test_every_decoded_frame_is_checked_not_only_the_header(fmt):
    """Motion JPEG: the header says 320x240, frame 6 is 4000x3000 (past 3840x2160)."""
    video = growing_frames_video([(320, 240)] * 6 + [(4000, 3000)] + [(320, 240)] * 5, fmt)
    with pytest.raises(InvalidVideo, match="video frame 6 is 4000x3000"):
        prepare_video(video, 12, VideoLimits())


def _unknown_codec(fmt: str) -> bytes:
    codec = "libvpx-vp9" if fmt == "webm" else "libx264"
    return unknown_codec(encode_video(grey_level_frames(10), codec=codec, fmt=fmt), fmt)


@pytest.mark.parametrize("fmt", ["mp4", "mov", "matroska", "webm"])
def test_a_codec_without_a_decoder_is_an_invalid_video(fmt):
    """PyAV leaves no codec context where FFmpeg has no decoder (this was a 500)."""
    with pytest.raises(InvalidVideo, match="codec is unknown"):
        prepare_video(_unknown_codec(fmt), 4, VideoLimits())


# ---- a real server ------------------------------------------------------------------------------

VIDEO_BUDGET_S = 3.0
SERVER_WORKERS = 5  # so that four videos at once leave one worker to images


@process_fixture(scope="module")
def hostile_vision(tiny_models, log_dir) -> Iterator[tuple[ServerProcess, str]]:
    server, target = start_vision_server(
        "media-workers-vision",
        tiny_models["hf"],
        log_dir,
        extra_args=[
            "--preprocess-workers", str(SERVER_WORKERS),
            "--media-worker-memory-mb", str(WORKER_MEMORY // MIB),
            "--max-image-pixels", str(BOMB_PIXELS),
            "--max-video-decode-s", str(VIDEO_BUDGET_S),
            "--media-item-timeout-s", "30",
            "--max-batch-tiles", "8",
            "--embedding-cache-mb", "0",
        ],
    )  # fmt: skip
    try:
        yield server, target
    finally:
        server.stop()


def workers_of(server: ServerProcess) -> list[int]:
    """The media worker processes of ``server`` (children of any of its threads)."""
    pids: list[int] = []
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return [pid for pid in pids if b"media_worker" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def idle_workers(server: ServerProcess) -> dict[int, float]:
    """Once every worker of ``server`` runs and waits for a task: pid -> CPU seconds."""
    wait_for(
        lambda: (
            len(pids := workers_of(server)) == SERVER_WORKERS
            and all(process_state(pid) == "S" for pid in pids)
        ),
        30,
        "every worker started and idle",
    )
    return {pid: cpu_seconds(pid) for pid in workers_of(server)}


def decoding_worker(idle: dict[int, float]) -> int:
    """The worker (of ``idle``) that has used 0.1 s of CPU since: the one decoding."""
    found: list[int] = []

    def busy() -> bool:
        found.extend(pid for pid, seconds in idle.items() if cpu_seconds(pid) > seconds + 0.1)
        return bool(found)

    wait_for(busy, 10, "a worker decoding")
    return found[0]


def expect_invalid(
    target: str, fragment: str, images: Sequence[bytes] = (), videos: Sequence[Any] = ()
) -> float:
    """Send the call; it must fail with INVALID_ARGUMENT naming ``fragment``; its seconds."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        encode_over_grpc(target, images, videos=videos, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert fragment in refused.value.details()
    return time.monotonic() - started


def assert_serving(target: str) -> None:
    (reply,) = encode_over_grpc(target, [IMAGE], timeout=60)
    assert reply.header.num_tiles == 7


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_hostile_images_get_a_400_and_the_service_serves_on(hostile_vision, fmt):
    server, target = hostile_vision
    bomb = image_bomb(fmt)
    assert expect_invalid(target, "image 0", [bomb]) < 30
    assert (
        expect_invalid(target, "image 0", [truncated(encode_image(noise_image(640, 480, 1), fmt))])
        < 30
    )
    # Noise in the data: an error, or pixels (decoders conceal damage); never anything else.
    with contextlib.suppress(grpc.RpcError):
        encode_over_grpc(target, [corrupt(encode_image(noise_image(640, 480, 2), fmt))])
    assert_serving(target)
    assert server.alive


# name: (the video, what its refusal says)
HOSTILE_VIDEOS: dict[str, tuple[Callable[[], bytes], str]] = {
    **{
        f"unknown-codec-{fmt}": (lambda fmt=fmt: _unknown_codec(fmt), "codec is unknown")
        for fmt in ("mp4", "mov", "matroska", "webm")
    },
    "growing-frames": (
        lambda: growing_frames_video([(320, 240)] * 4 + [(4000, 3000)]),
        "video frame 4 is 4000x3000",
    ),
    "truncated": (lambda: truncated(encode_video(mixed_frames(20))), "video 0"),
}


@pytest.mark.parametrize("name", list(HOSTILE_VIDEOS))
def test_hostile_videos_get_a_400(hostile_vision, name):
    _, target = hostile_vision
    make, fragment = HOSTILE_VIDEOS[name]
    seconds = expect_invalid(target, fragment, videos=[(make(), 8)])
    assert seconds < 30
    assert_serving(target)


def test_a_corrupt_video_is_a_400_or_frames(hostile_vision):
    _, target = hostile_vision
    video = corrupt(encode_video(mixed_frames(20, seed=5)), seed=3)
    try:
        (reply,) = encode_over_grpc(target, [], videos=[(video, 8)], timeout=60)
        assert reply.header.num_tiles == 8
    except grpc.RpcError as refused:
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(target)


def test_four_long_videos_at_once_while_images_are_served(hostile_vision, long_video):
    """Four videos within every header limit whose decoding exceeds the budget, at once:
    each gets its 400 once its budget is spent, and images sent meanwhile are served by the
    worker that videos never take."""
    server, target = hostile_vision
    resident_before = memory_kib(server.proc.pid, "VmRSS") or 0
    with ThreadPoolExecutor(max_workers=5) as clients:
        videos = [
            clients.submit(expect_invalid, target, "took more than 3 s", videos=[(long_video, 8)])
            for _ in range(4)
        ]
        served = 0
        while not all(video.done() for video in videos):
            started = time.monotonic()
            (reply,) = encode_over_grpc(target, [IMAGE], timeout=60)
            assert reply.header.num_tiles == 7
            assert time.monotonic() - started < 10
            served += 1
        seconds = [video.result() for video in videos]
    assert served >= 1
    assert max(seconds) < VIDEO_BUDGET_S + 10  # the budget, the probe, the call
    # Frames are decoded elsewhere: this process holds none of them.
    assert (memory_kib(server.proc.pid, "VmRSS") or 0) - resident_before < 300 * 1024
    for pid in workers_of(server):
        assert (memory_kib(pid, "VmPeak") or 0) * 1024 <= WORKER_MEMORY


def test_a_worker_killed_mid_decode_fails_only_its_request(hostile_vision, long_video):
    """SIGSEGV to the worker decoding a video (found among the server's children by its
    CPU time): that request fails with INVALID_ARGUMENT; an image request at the same time is
    served; the server starts a new worker."""
    server, target = hostile_vision
    idle = idle_workers(server)
    with ThreadPoolExecutor(max_workers=2) as clients:
        video = clients.submit(
            expect_invalid, target, "crashed (SIGSEGV)", videos=[(long_video, 8)]
        )
        busy = decoding_worker(idle)
        image = clients.submit(encode_over_grpc, target, [IMAGE], timeout=60)
        os.kill(busy, signal.SIGSEGV)
        video.result(timeout=60)
        (reply,) = image.result(timeout=60)
    assert reply.header.num_tiles == 7
    idle_workers(server)  # back to its size
    assert busy not in workers_of(server)
    (frames,) = encode_over_grpc(target, [], videos=[(encode_video(grey_level_frames(10)), 4)])
    assert frames.header.num_tiles == 4


def test_a_cancelled_call_stops_its_decoding(hostile_vision, long_video):
    """The client cancels its call while a worker decodes its video: the worker stops (is
    told, or killed) at once; here through gRPC's cancellation, within a second."""
    server, target = hostile_vision
    idle = idle_workers(server)
    request = vision_pb2.EncodeRequest(
        request_id="cancelled", videos=[vision_pb2.Video(data=long_video, num_frames=8)]
    )
    with grpc.insecure_channel(target) as channel:
        call = vision_pb2_grpc.VisionServiceStub(channel).Encode(request, timeout=60)
        busy = decoding_worker(idle)
        call.cancel()
        stopped = wait_for(lambda: process_state(busy) in (None, "S"), 5, "the worker stopped")
    assert stopped < 1.0
    assert_serving(target)

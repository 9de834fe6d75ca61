"""The media workers, from the server's side: a pool of processes that decode and tile images
and videos (``media_worker.py``), each under a memory limit and a CPU-time limit per item.

Each worker has a slot here: a thread that starts the process, hands it one item at a time and
reads its answers, and starts a new process when the last one crashed, ran out of a limit, was
killed, or answered out of protocol. Whatever happens to a worker fails only the item it had
(``InvalidImage``/``InvalidVideo``, a 400 through the API); when no worker can be started at
all, items fail with ``MediaWorkersUnavailable`` (``UNAVAILABLE``, a 503). Tiles come back
through a block of shared memory per slot (an anonymous, sealed ``memfd`` the server creates)
under a fixed record that is checked against what was asked before a byte is copied out
(``media_protocol``); nothing from a worker is unpickled.

A call that no longer wants its item (cancelled, or failed elsewhere) has the worker told to
stop (a flag in the block, which video decoding looks at between frames); a worker that has
not stopped ``cancel_grace_s`` later (an image is decoded in one C call) is killed and
replaced. Videos take at most all workers but one, so that images never all queue behind
videos that use their whole budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import math
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from protos.tiling import TileGrid, TilingOptions
from vision_server import media_protocol as wire
from vision_server import metrics
from vision_server.engine import TileParts
from vision_server.errors import InvalidImage, InvalidVideo, MediaWorkersUnavailable, VisionError
from vision_server.preprocess import ImageLimits, PreparedImage
from vision_server.video import (
    PreparedVideo,
    VideoLimits,
    VideoStreamInfo,
    frame_grid,
    segment_middles,
)

logger = logging.getLogger(__name__)

# How long a task's input and output may keep their pages in the block after the task: beyond
# this, the pages are handed back to the kernel (a large video's file and frames would
# otherwise stay resident in every worker's block).
_KEEP_BLOCK_BYTES = 8 * 1024 * 1024
_READ_BYTES = 64 * 1024
_RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class MediaWorkerConfig:
    workers: int
    memory_bytes: int  # RLIMIT_AS of each worker
    item_cpu_s: int  # RLIMIT_CPU per item
    item_timeout_s: float  # wall time per item, then the worker is killed
    image_limits: ImageLimits
    video_limits: VideoLimits
    max_image_tiles: int  # the largest grid plus its thumbnail
    max_frames: int  # the most frames a video may sample
    tile_size: int
    cancel_grace_s: float = 0.04  # a stop not acknowledged by then is a kill
    start_timeout_s: float = 60.0

    @property
    def video_workers(self) -> int:
        return max(1, self.workers - 1)

    @property
    def layout(self) -> wire.BlockLayout:
        return wire.BlockLayout(
            input_capacity=max(self.image_limits.max_image_bytes, self.video_limits.max_bytes),
            output_tiles=max(self.max_image_tiles, self.max_frames),
            tile_size=self.tile_size,
        )


def default_workers() -> int:
    """One worker per CPU this process may use: the CPUs it may run on, or fewer where its
    cgroup's quota says so (a container's CPU limit: the node's CPU count would start a worker
    per node CPU, each with its own memory); at most 32, at least 2 (so that videos never hold
    every worker)."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # cgroup v2
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    return max(2, min(32, cpus))


class _Job:
    """One image or video for a worker, and its outcomes as futures: the grid once decoded
    (images), each part once cut (images cut in parts), the item once whole."""

    def __init__(
        self,
        kind: Literal["image", "video"],
        data: bytes,
        options: TilingOptions | None = None,
        in_parts: bool = False,
        num_frames: int = 0,
    ) -> None:
        self.kind = kind
        self.data = data
        self.options = options
        self.in_parts = in_parts
        self.num_frames = num_frames
        self.grid: Future[TileGrid] = Future()
        self.parts: list[Future[torch.Tensor]] = []
        self.result: Future[PreparedImage | PreparedVideo] = Future()
        self.cancel_requested = False
        self.cancelled_at = 0.0  # time.monotonic() of the cancel
        self.lock = threading.Lock()
        self.slot: _Slot | None = None

    @property
    def error_type(self) -> type[InvalidImage] | type[InvalidVideo]:
        return InvalidImage if self.kind == "image" else InvalidVideo

    def futures(self) -> list[Future[Any]]:
        return [self.grid, *self.parts, self.result]

    def fail(self, error: BaseException) -> None:
        for future in self.futures():
            _settle(future, error=error)

    def cancel(self) -> None:
        """From any thread: the caller no longer wants the item."""
        with self.lock:
            if self.cancel_requested:
                return
            self.cancel_requested = True
            self.cancelled_at = time.monotonic()
            slot = self.slot
        if slot is not None:
            slot.wake()
        for future in self.futures():
            future.cancel()


def _settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless its caller cancelled it already."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class _Queue:
    """Jobs waiting for a worker, oldest first; a video waits while ``video_workers`` videos
    are being decoded, and the images behind it go first."""

    def __init__(self, video_workers: int) -> None:
        self._jobs: deque[_Job] = deque()
        self._changed = threading.Condition()
        self._video_workers = video_workers
        self._videos = 0
        self.closed = False

    def put(self, job: _Job) -> None:
        with self._changed:
            self._jobs.append(job)
            self._changed.notify_all()

    def remove(self, job: _Job) -> None:
        with self._changed, contextlib.suppress(ValueError):
            self._jobs.remove(job)

    def take(self) -> _Job | None:
        """The next job for a worker (blocking); None once closed."""
        with self._changed:
            while not self.closed:
                for job in self._jobs:
                    if job.kind == "image" or self._videos < self._video_workers:
                        self._jobs.remove(job)
                        self._videos += job.kind == "video"
                        return job
                self._changed.wait()
            return None

    def finished(self, job: _Job) -> None:
        with self._changed:
            self._videos -= job.kind == "video"
            self._changed.notify_all()

    def drain(self) -> list[_Job]:
        with self._changed:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()


class _WorkerLost(Exception):  # noqa: N818 (an outcome)
    """The worker is gone, or no longer trusted: ``label`` for the metric, ``reason`` (when
    known here) for the item's error; otherwise its exit status says."""

    def __init__(self, label: str, reason: str | None = None) -> None:
        super().__init__(reason or label)
        self.label = label
        self.reason = reason


class _Cancelled(Exception):  # noqa: N818 (an outcome)
    """The job's caller gave up, or the pool is closing."""


class _Slot:
    """One worker process and the thread that drives it."""

    def __init__(self, pool: MediaWorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.layout = pool.config.layout
        # Anonymous shared memory, sealed at its size: a worker can neither shrink it under
        # our mapping (our reads would fault) nor grow it.
        self.memfd = os.memfd_create(f"dvd-media-{index}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, self.layout.size)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, seals)
        self.block = mmap.mmap(self.memfd, self.layout.size)
        size, layout = self.layout.tile_size, self.layout
        self.output = np.frombuffer(
            self.block, np.uint8, layout.output_tiles * layout.tile_bytes, layout.output_offset
        ).reshape(layout.output_tiles, 3, size, size)
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.process: subprocess.Popen[bytes] | None = None
        self.task_fd = -1
        self.result_fd = -1
        self.reader = wire.MessageReader()
        self.pending: deque[wire.Message] = deque()
        self.cpu_seen = 0.0
        self.stat_fd = -1  # the worker's /proc/<pid>/stat, kept open: a pread per item
        self.recycle_bytes = 0  # address space at rest past which the worker is replaced
        self.first_start = threading.Event()  # set once the first start has succeeded or failed
        self.thread = threading.Thread(target=self._run, name=f"media-worker-{index}", daemon=True)

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.poll() is None else None

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self.wake_fd, 1)

    def _clear_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake_fd)

    # ---- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self.pool.closing:
            if self.pid is None:
                try:
                    self._restart()
                except _WorkerLost as exc:
                    failures += 1
                    self.pool.start_failed(self, str(exc))
                    self.first_start.set()
                    self._pause(_RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S)) - 1])
                    continue
                failures = 0
                self.pool.start_succeeded(self)
                self.first_start.set()
            job = self.pool.queue.take()
            if job is None:
                break
            try:
                self._serve(job)
            finally:
                self.pool.queue.finished(job)
        self._reap()

    def _pause(self, seconds: float) -> None:
        """Wait between two starts, unless the pool closes."""
        select.select([self.wake_fd], [], [], seconds)
        self._clear_wake()

    # ---- the process ------------------------------------------------------------------------

    def _restart(self) -> None:
        """Reap what is left of the last worker and start a new one; ``_WorkerLost`` when it
        does not start."""
        self._reap()
        try:
            self._start()
        except (TimeoutError, wire.ProtocolError, _Cancelled, OSError) as exc:
            self._reap()
            raise _WorkerLost("start", f"the media worker did not start: {exc!r}") from exc
        except _WorkerLost as exc:
            status = self._reap()
            raise _WorkerLost(
                "start", f"the media worker exited at start (status {status})"
            ) from exc

    def _start(self) -> None:
        config = self.pool.config
        task_read, self.task_fd = os.pipe()
        self.result_fd, result_write = os.pipe()
        worker_config = {
            "parent_pid": os.getpid(),
            "workers": config.workers,
            "task_fd": task_read,
            "result_fd": result_write,
            "block_fd": self.memfd,
            "memory_bytes": config.memory_bytes,
            "item_cpu_s": config.item_cpu_s,
            "layout": asdict(self.layout),
            "image_limits": {
                **asdict(config.image_limits),
                "allowed_formats": sorted(config.image_limits.allowed_formats),
            },
            "video_limits": asdict(config.video_limits),
        }
        self.reader = wire.MessageReader()
        self.pending.clear()
        try:
            self.process = subprocess.Popen(
                [*self.pool.command, json.dumps(worker_config)],
                pass_fds=(task_read, result_write, self.memfd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=_worker_environment(),
                cwd="/",
                start_new_session=True,  # no controlling terminal (nor its signals)
            )
        finally:
            os.close(task_read)
            os.close(result_write)
        message = self._next_message(time.monotonic() + config.start_timeout_s, None)
        if not isinstance(message, wire.Ready) or message.pid != self.process.pid:
            raise wire.ProtocolError(f"{message!r} instead of its start")
        self.stat_fd = os.open(f"/proc/{self.process.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        self.cpu_seen, start_bytes = _usage(self.stat_fd)
        # Half of what its limit leaves it at start (see _after_item).
        self.recycle_bytes = (start_bytes + config.memory_bytes) // 2
        self.pool.note_isolation(message.flags)

    def kill(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)

    def _reap(self) -> int | None:
        """Kill what is left of the worker, wait for it and close its pipes; its exit status
        (negative: the signal that ended it)."""
        status = None
        if self.process is not None:
            self.kill()
            status = self.process.wait()
            self.process = None
        for fd in (self.task_fd, self.result_fd, self.stat_fd):
            if fd >= 0:
                os.close(fd)
        self.task_fd = self.result_fd = self.stat_fd = -1
        return status

    def _lost(self, job: _Job, lost: _WorkerLost) -> None:
        """The worker is done for: fail its item, saying why, and replace it (next loop)."""
        status = self._reap()
        label, reason = lost.label, lost.reason
        if reason is None:  # it ended by itself: its exit status says how
            if status == -signal.SIGXCPU:
                label = "cpu_limit"
                reason = (
                    f"decoding the {job.kind} used more than {self.pool.config.item_cpu_s} s of "
                    "CPU, the limit"
                )
            elif status is not None and status < 0:
                reason = f"the decoder crashed ({signal.Signals(-status).name})"
            else:
                reason = f"the decoder exited (status {status})"
        metrics.media_worker_restarts.labels(reason=label).inc()
        if self.pool.closing:
            job.fail(MediaWorkersUnavailable("the vision service is shutting down"))
            return
        logger.warning("media worker %d replaced after a %s: %s", self.index, job.kind, reason)
        job.fail(job.error_type(f"cannot decode {job.kind}: {reason}"))

    # ---- one job ----------------------------------------------------------------------------

    def _serve(self, job: _Job) -> None:
        with job.lock:
            if job.cancel_requested:
                return
            job.slot = self
        self._clear_wake()  # a wake-up meant for an earlier job
        try:
            if self.pid is None:  # it died while idle: not this item's fault
                try:
                    self._restart()
                except _WorkerLost as exc:
                    job.fail(MediaWorkersUnavailable(f"no media worker runs: {exc}"))
                    return
            self._run_job(job)
        finally:
            with job.lock:
                job.slot = None
            self._after_item()
            self._release_pages(job)

    def _run_job(self, job: _Job) -> None:
        deadline = time.monotonic() + self.pool.config.item_timeout_s
        try:
            task_id = self._send(job)
            outcome = _Outcome(job, self.pool.config, self.output)
            while not outcome.finished:
                message = self._next_message(deadline, job)
                if getattr(message, "task_id", None) != task_id:
                    raise _Unexpected(f"{message!r} during task {task_id}")
                outcome.take(message)
        except _Cancelled:
            if job.cancel_requested:
                self._stop(job)
            else:  # the pool is closing
                self._lost(job, _WorkerLost("closing", "the vision service is shutting down"))
        except _WorkerLost as exc:
            self._lost(job, exc)
        except (wire.ProtocolError, _Unexpected) as exc:
            logger.warning("media worker %d answered out of protocol: %s", self.index, exc)
            self._lost(job, _WorkerLost("protocol", "the decoder answered out of protocol"))
        except TimeoutError:
            timeout = self.pool.config.item_timeout_s
            self._lost(job, _WorkerLost("timeout", f"decoding took more than {timeout:g} s"))
        except Exception as exc:  # our own bug: the item fails, the service goes on
            logger.exception("media worker %d: unexpected error", self.index)
            self._lost(job, _WorkerLost("internal", f"internal error ({type(exc).__name__})"))

    def _send(self, job: _Job) -> int:
        task_id = self.pool.next_task_id()
        # numpy copies without the GIL (a slice assignment of the mmap would hold it).
        start = self.layout.input_offset
        target = np.frombuffer(self.block, np.uint8, len(job.data), start)
        np.copyto(target, np.frombuffer(job.data, np.uint8))
        self.block[wire.BlockLayout.CANCEL_OFFSET] = 0
        task: wire.Task
        if job.options is not None:
            options = job.options
            task = wire.ImageTask(
                task_id,
                len(job.data),
                options.min_tiles,
                options.max_tiles,
                options.use_thumbnail,
                options.tile_size,
                job.in_parts,
            )
        else:
            task = wire.VideoTask(task_id, len(job.data), job.num_frames, self.layout.tile_size)
        try:
            os.write(self.task_fd, wire.encode_task(task))
        except OSError as exc:  # it died since it was started
            raise _WorkerLost("crashed") from exc
        if self.pool.task_sent is not None and self.process is not None:
            self.pool.task_sent(self.process.pid)
        return task_id

    def _next_message(self, deadline: float, job: _Job | None) -> wire.Message:
        """The worker's next record. Raises ``_Cancelled`` when ``job`` is cancelled or the pool
        closes, ``_WorkerLost`` when the worker is gone, ``TimeoutError`` past ``deadline``."""
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer in {deadline:.1f}")
            readable, _, _ = select.select([self.result_fd, self.wake_fd], [], [], remaining)
            if self.wake_fd in readable:
                self._clear_wake()
                if self.pool.closing or (job is not None and job.cancel_requested):
                    raise _Cancelled
            if self.result_fd in readable:
                chunk = os.read(self.result_fd, _READ_BYTES)
                if not chunk:
                    raise _WorkerLost("crashed")
                self.pending.extend(self.reader.feed(chunk))
        return self.pending.popleft()

    def _stop(self, job: _Job) -> None:
        """Tell the worker to stop ``job``; kill it when it has not within the grace."""
        self.block[wire.BlockLayout.CANCEL_OFFSET] = 1
        deadline = time.monotonic() + self.pool.config.cancel_grace_s
        try:
            while not isinstance(
                self._next_message(deadline, None), wire.Cancelled | wire.Done | wire.Failed
            ):
                pass
        except (TimeoutError, _WorkerLost, wire.ProtocolError, _Cancelled):
            self._reap()
            metrics.media_worker_restarts.labels(reason="cancelled").inc()
        self.pending.clear()
        self.pool.note_cancel(time.monotonic() - job.cancelled_at)

    def _after_item(self) -> None:
        """Count the worker's CPU time, and replace a worker whose address space has stayed
        large: the C allocator keeps what a large (or hostile) item made it take, and the
        next item would meet the memory limit sooner than a fresh worker does."""
        if self.stat_fd < 0 or self.pid is None:
            return
        seen, address_space = _usage(self.stat_fd)
        metrics.media_worker_cpu_seconds.inc(max(0.0, seen - self.cpu_seen))
        self.cpu_seen = seen
        if address_space > self.recycle_bytes:
            logger.info(
                "media worker %d replaced: %d MiB of address space at rest",
                self.index,
                address_space >> 20,
            )
            metrics.media_worker_restarts.labels(reason="recycled").inc()
            self._reap()

    def _release_pages(self, job: _Job) -> None:
        """Hand back to the kernel the pages a large item used beyond ``_KEEP_BLOCK_BYTES``
        of the input and of the output."""
        layout = self.layout
        tiles = job.num_frames or (job.options.max_tiles + 1 if job.options else 0)
        regions = (
            (layout.input_offset, len(job.data), layout.output_offset),
            (layout.output_offset, tiles * layout.tile_bytes, layout.size),
        )
        for start, used, region_end in regions:
            begin = start + _KEEP_BLOCK_BYTES
            end = min(_round_up_page(start + used), region_end)
            if end > begin:
                self.block.madvise(mmap.MADV_REMOVE, begin, end - begin)

    def close(self) -> None:
        del self.output
        # A view may outlive us (in a traceback): then the mapping goes with the last view.
        with contextlib.suppress(BufferError):
            self.block.close()
        for fd in (self.memfd, self.wake_fd):
            os.close(fd)


class _Unexpected(Exception):  # noqa: N818
    """A well-formed record that does not fit what was asked."""


class _Outcome:
    """Checks a worker's answers to one job against what was asked, copies its tiles out of
    the block, and settles the job's futures."""

    def __init__(self, job: _Job, config: MediaWorkerConfig, block_tiles: np.ndarray) -> None:
        self.job = job
        self.config = config
        self.block_tiles = block_tiles  # [output_tiles, 3, size, size] uint8, the worker's
        self.tiles: torch.Tensor | None = None  # [n, 3, size, size] uint8, ours
        self.grid: TileGrid | None = None
        self.info: VideoStreamInfo | None = None
        self.copied: list[bool] = []
        self.finished = False

    def take(self, message: wire.Message) -> None:
        job = self.job
        match message:
            case wire.Plan() if job.kind == "image" and self.grid is None:
                self._plan(message)
            case wire.VideoInfo() if job.kind == "video" and self.info is None:
                self._video(message)
            case wire.Tiles() if self.tiles is not None:
                self._tiles(message)
            case wire.Done() if self.tiles is not None:
                if message.tiles != len(self.copied) or not all(self.copied):
                    raise _Unexpected(f"done with {sum(self.copied)} of {len(self.copied)} tiles")
                self._done()
            case wire.Failed():
                job.fail(job.error_type(_printable(message.text)))
                self.finished = True
            case _:
                raise _Unexpected(f"{message!r} for a {job.kind}")

    def _plan(self, plan: wire.Plan) -> None:
        options = self.job.options
        assert options is not None
        pixels = plan.width * plan.height
        if not (
            plan.width >= 1 and plan.height >= 1 and pixels <= self.config.image_limits.max_pixels
        ):
            raise _Unexpected(f"an image of {plan.width}x{plan.height}")
        expected = options.plan(plan.width, plan.height)
        grid = TileGrid(plan.columns, plan.rows, plan.thumbnail, plan.tile_size)
        if grid != expected:
            raise _Unexpected(f"{grid} for an image of {plan.width}x{plan.height}")
        self.grid = grid
        self._allocate(grid.num_tiles)
        if self.job.in_parts:  # its caller waits for the grid, then for each part
            if grid.thumbnail:
                self.job.parts = [Future(), Future()]  # the grid, the thumbnail
                for part in self.job.parts:
                    part.add_done_callback(_cancel_job_with(self.job))
            _settle(self.job.grid, grid)

    def _video(self, info: wire.VideoInfo) -> None:
        limits = self.config.video_limits
        sane = (
            info.width >= 1 and info.height >= 1 and info.width * info.height <= limits.max_pixels
            and 1 <= info.total_frames <= limits.max_decoded_frames
            and math.isfinite(info.duration_s) and 0 <= info.duration_s <= limits.max_duration_s
            and math.isfinite(info.fps) and info.fps >= 0
        )  # fmt: skip
        if not sane:
            raise _Unexpected(f"a video stream {info!r}")
        self.info = VideoStreamInfo(
            info.width, info.height, info.total_frames, info.duration_s, info.fps
        )
        self._allocate(self.job.num_frames)

    def _allocate(self, count: int) -> None:
        if count > len(self.block_tiles):
            raise _Unexpected(f"{count} tiles")
        size = self.config.tile_size
        self.tiles = torch.empty((count, 3, size, size), dtype=torch.uint8)
        self.copied = [False] * count

    def _tiles(self, tiles: wire.Tiles) -> None:
        assert self.tiles is not None
        size = self.config.tile_size
        described = (tiles.dtype, tiles.channels, tiles.height, tiles.width)
        if described != (wire.DTYPE_UINT8, 3, size, size):
            raise _Unexpected(f"tiles of dtype {tiles.dtype} and shape {described[1:]}")
        first, end = tiles.first, tiles.first + tiles.count
        if not 0 <= first < end <= len(self.copied) or any(self.copied[first:end]):
            raise _Unexpected(f"tiles {first}..{end} of {len(self.copied)}")
        # Ours from here on: the block is the worker's again for its next item. numpy copies
        # without the GIL (codec.copy_bytes says why not torch).
        np.copyto(self.tiles[first:end].numpy(), self.block_tiles[first:end])
        self.copied[first:end] = [True] * (end - first)
        if self.job.parts and self.grid is not None:
            grid_tiles = self.grid.grid_tiles
            if all(self.copied[:grid_tiles]):
                _settle(self.job.parts[0], self.tiles[:grid_tiles])
            if self.copied[grid_tiles]:
                _settle(self.job.parts[1], self.tiles[grid_tiles:])

    def _done(self) -> None:
        assert self.tiles is not None
        job = self.job
        if self.grid is not None:
            _settle(job.result, PreparedImage(self.tiles, self.grid))
        else:
            assert self.info is not None
            frames = PreparedImage(self.tiles, frame_grid(self.config.tile_size))
            # Which frames were sampled follows from the frame count: not taken from the worker.
            numbers = segment_middles(self.info.total_frames, job.num_frames)
            _settle(job.result, PreparedVideo(frames, numbers, self.info))
        self.finished = True


def _cancel_job_with(job: _Job) -> Callable[[Future[Any]], None]:
    def on_done(future: Future[Any]) -> None:
        if future.cancelled():  # a part the caller dropped: the whole item is unwanted
            job.cancel()

    return on_done


def _printable(text: str) -> str:
    """A worker's reason, for an error message that may reach a client: printable ASCII."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[: wire.MAX_TEXT_BYTES])


def _round_up_page(value: int) -> int:
    return -(-value // wire.PAGE) * wire.PAGE


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _usage(stat_fd: int) -> tuple[float, int]:
    """User + system CPU seconds so far and address-space bytes of the process whose
    ``/proc/<pid>/stat`` is open as ``stat_fd`` (zeros when it is gone)."""
    try:
        # The fields after the command name, from the state (the third) on.
        fields = os.pread(stat_fd, 1024, 0).rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS, int(fields[20])


def _worker_environment() -> dict[str, str]:
    """A worker's whole environment: where our packages are, and one thread per library.
    Nothing else of the server's (tokens, cloud credentials) is passed on."""
    package_root = str(Path(__file__).resolve().parent.parent)
    return {
        "PYTHONPATH": package_root,
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        # One malloc arena per thread would reserve 64 MB of address space each (RLIMIT_AS).
        "MALLOC_ARENA_MAX": "2",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


class MediaWorkerPool:
    """Decodes and tiles images and videos in worker processes; usable from any event loop
    (its threads settle concurrent futures, awaited through ``asyncio.wrap_future``)."""

    def __init__(self, config: MediaWorkerConfig) -> None:
        self.config = config
        # A fresh interpreter per worker (multiprocessing's 'spawn', without its pickling);
        # ``-s``: no user site-packages. Tests start other programs here.
        self.command = [sys.executable, "-s", "-m", "vision_server.media_worker"]
        self.queue = _Queue(config.video_workers)
        self.closing = False
        self._task_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._live: set[int] = set()
        self._down: VisionError | None = None
        self._isolation_logged = False
        # From a call's cancel to its worker stopped (told, or killed), the last 64 (tests).
        self.cancel_seconds: list[float] = []
        # Test hook: called on a slot's thread with the worker's pid when a task is sent.
        self.task_sent: Callable[[int], None] | None = None
        self.slots = [_Slot(self, index) for index in range(config.workers)]
        for slot in self.slots:
            slot.thread.start()
        for slot in self.slots:
            slot.first_start.wait(config.start_timeout_s + 5)
        if not self._live:
            self.close()
            raise RuntimeError(f"no media worker could be started: {self._down}")

    # ---- state, from the slots' threads -----------------------------------------------------

    def start_succeeded(self, slot: _Slot) -> None:
        with self._lock:
            self._live.add(slot.index)
            self._down = None

    def start_failed(self, slot: _Slot, reason: str) -> None:
        if self.closing:
            return
        logger.error("media worker %d could not start: %s", slot.index, reason)
        with self._lock:
            self._live.discard(slot.index)
            if self._live:
                return
            self._down = MediaWorkersUnavailable(
                f"images and videos cannot be decoded: no media worker runs ({reason})"
            )
            error = self._down
        for job in self.queue.drain():
            job.fail(error)

    def note_isolation(self, flags: int) -> None:
        """Log once what the kernel let the workers shed (``Ready.flags``)."""
        if self._isolation_logged:
            return
        self._isolation_logged = True
        if flags & wire.NETWORK_ISOLATED:
            logger.info("media workers run without network (a network namespace of their own)")
        else:
            logger.info(
                "media workers share the host's network: this kernel lets no unprivileged "
                "process create a network namespace (see docs/security.md)"
            )
        if flags & wire.SHM_HIDDEN:
            logger.info("media workers see an empty /dev/shm of their own")
        else:
            logger.info(
                "media workers see the host's /dev/shm (no mount namespace could be made; "
                "see docs/security.md)"
            )

    def note_cancel(self, seconds: float) -> None:
        self.cancel_seconds.append(seconds)
        del self.cancel_seconds[:-64]

    def next_task_id(self) -> int:
        return next(self._task_ids) & 0xFFFFFFFF  # next() on a count is atomic under the GIL

    # ---- the API ----------------------------------------------------------------------------

    @property
    def down(self) -> VisionError | None:
        """Why no item can be decoded now (no worker runs), or None."""
        with self._lock:
            return self._down

    def worker_pids(self) -> list[int]:
        """The workers' process ids (those running now)."""
        return [pid for slot in self.slots if (pid := slot.pid) is not None]

    def _submit(self, job: _Job) -> _Job:
        down = self.down
        if self.closing:
            raise MediaWorkersUnavailable("the vision service is shutting down")
        if down is not None:
            raise down
        self.queue.put(job)
        return job

    async def prepare_image(
        self, data: bytes, options: TilingOptions, in_parts: bool = False
    ) -> PreparedImage | TileParts:
        """Decode and tile one image in a worker. ``in_parts``: return as soon as it is
        decoded, its grid and thumbnail as parts that are ready as each is cut (an image of
        one tile comes whole)."""
        self._check_size(data, self.config.image_limits.max_image_bytes, InvalidImage)
        job = self._submit(_Job("image", data, options, in_parts=in_parts))
        try:
            if in_parts:
                grid = await asyncio.wrap_future(job.grid)
                if job.parts:
                    return TileParts([asyncio.wrap_future(part) for part in job.parts], grid)
            return cast(PreparedImage, await asyncio.wrap_future(job.result))
        except BaseException:
            job.cancel()
            self.queue.remove(job)
            raise

    async def prepare_video(self, data: bytes, num_frames: int) -> PreparedVideo:
        """Check, measure and sample one video in a worker, within its budgets."""
        self._check_size(data, self.config.video_limits.max_bytes, InvalidVideo)
        if not 1 <= num_frames <= self.config.max_frames:
            raise InvalidVideo(f"num_frames={num_frames} is outside [1, {self.config.max_frames}]")
        job = self._submit(_Job("video", data, num_frames=num_frames))
        try:
            return cast(PreparedVideo, await asyncio.wrap_future(job.result))
        except BaseException:
            job.cancel()
            self.queue.remove(job)
            raise

    @staticmethod
    def _check_size(data: bytes, limit: int, error: type[VisionError]) -> None:
        # Checked here too: the file must fit the worker's block.
        what = "image" if error is InvalidImage else "video"
        if not data:
            raise error(f"{what} is empty")
        if len(data) > limit:
            raise error(f"{what} is {len(data)} bytes; the limit is {limit} bytes")

    def close(self) -> None:
        """Stop every worker (what they were decoding fails) and the threads."""
        self.closing = True
        self.queue.close()
        for job in self.queue.drain():
            job.fail(MediaWorkersUnavailable("the vision service is shutting down"))
        for slot in self.slots:
            slot.wake()
            slot.kill()
        for slot in self.slots:
            slot.thread.join(timeout=10)
            if not slot.thread.is_alive():
                slot.close()

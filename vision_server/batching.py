"""Dynamic batching of tiles across concurrent requests, with passes pipelined on the device.

Each image is a job of N tiles. One loop packs queued tiles (several images, several
requests; a large image may be split across passes) into forward passes of at most
``max_batch_tiles``. A pass starts at once when the device is idle (waiting would only add
latency), and otherwise when it is full, when ``max_wait_ms`` have passed since its oldest
tile was queued, or when the device becomes idle, whichever comes first: tiles that arrive
while a pass runs share the next one.

A pass has two halves, each on its own thread so the event loop never waits on the device:
*launch* (``run_pass``: stage the tiles, queue the copy in, the forward pass and the copies
back) and *wait* (``LaunchedPass.wait``: block until the device is done). On a GPU, launching
returns long before the pass ends, so the next pass is staged and copied in while the current
one computes; ``max_inflight`` passes (``--passes-in-flight``, 2 by default: one computing,
one staged) are in flight at most.

Tiles do not attend to each other, so an image gets the embeddings it gets alone, whatever
shares its pass: the 256-token rows bit for bit on the CPU; the router's small products (its
p0 and the 64-token rows) may round their last bit differently with the pass size.

Faults: a pass that fails fails the images in it, and only those (a device out-of-memory error
becomes ``EncoderOutOfMemory``, anything else ``EncodeFailed``); the loop keeps serving. An
error that leaves the device unusable (``torch.AcceleratorError``), or the loop itself dying,
is fatal: every queued and in-flight image fails with ``EngineFailed``, later submissions are
refused at once, and ``on_fatal`` tells the server, which reports NOT_SERVING and exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from vision_server import tracing
from vision_server.errors import (
    EncodeFailed,
    EncoderOutOfMemory,
    EngineFailed,
    Overloaded,
    ShuttingDown,
    VisionError,
)
from vision_server.threads import started_pool
from vision_server.tracing import PassRecord

logger = logging.getLogger(__name__)

Piece = TypeVar("Piece")
Piece_co = TypeVar("Piece_co", covariant=True)


@dataclass
class BatchStats:
    """What happened to one image's tiles in the batcher."""

    queue_ms: float
    encode_ms: float
    # For tracing (``vision_server.tracing.item_spans``): perf_counter() readings, and the
    # passes the image's tiles joined (recorded only while tracing is on).
    enqueued_at: float = 0.0
    first_pass_at: float = 0.0
    passes: tuple[PassRecord, ...] = ()


@dataclass(frozen=True)
class PassSlice:
    """Consecutive tiles of one image in a pass, and what that image wants back."""

    tiles: torch.Tensor  # [k, 3, H, W], on the host
    want: Any  # opaque to the batcher: passed through to ``run_pass``


class LaunchedPass(Protocol[Piece_co]):
    def wait(self) -> Sequence[Piece_co]:
        """Block until the pass is done; one piece per slice, in slice order."""
        ...


RunPass = Callable[[Sequence[PassSlice]], LaunchedPass[Piece]]


# eq=False: jobs are found by identity. Generated __eq__ would compare the tile tensors, and
# `job in queue` would raise instead of answering.
@dataclass(eq=False)
class _Job(Generic[Piece]):
    request_id: str
    tiles: torch.Tensor  # [n, 3, H, W]
    want: Any
    future: asyncio.Future[tuple[list[Piece], BatchStats]]
    enqueued_at: float
    bytes_per_tile: int
    next_tile: int = 0
    pieces: list[Piece] = field(default_factory=list)
    first_pass_at: float | None = None
    encode_seconds: float = 0.0
    passes: list[PassRecord] = field(default_factory=list)  # while tracing is on

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def remaining(self) -> int:
        return self.num_tiles - self.next_tile


@dataclass(eq=False)
class _Pass(Generic[Piece]):
    slices: list[tuple[_Job[Piece], int, int]]  # (job, first tile, end tile)
    started: float
    pass_id: int = 0

    @property
    def num_tiles(self) -> int:
        return sum(end - start for _, start, end in self.slices)


def pass_error(exc: BaseException, num_tiles: int) -> VisionError:
    """What the images of a failed pass of ``num_tiles`` tiles are told."""
    if isinstance(exc, VisionError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return EncoderOutOfMemory(
            f"the vision encoder ran out of device memory on a pass of {num_tiles} tiles; "
            "retry later (the operator can lower --max-batch-tiles)"
        )
    return EncodeFailed(
        f"the vision encoder failed on a pass of {num_tiles} tiles: {type(exc).__name__}: {exc}"
    )


def is_fatal(exc: BaseException) -> bool:
    """Errors after which the device cannot be trusted to run another pass (CUDA's sticky
    errors: illegal address, device-side assert, ...). Out-of-memory is not one of them."""
    return isinstance(exc, torch.AcceleratorError) and not isinstance(exc, torch.OutOfMemoryError)


class TileBatcher(Generic[Piece]):
    """Packs tiles of concurrent images into shared forward passes.

    ``run_pass(slices)`` runs on the launch thread and returns a ``LaunchedPass`` whose
    ``wait()`` runs on the wait thread. ``submit`` returns one image's pieces, one per pass its
    tiles went through, in tile order.
    """

    def __init__(
        self,
        run_pass: RunPass[Piece],
        *,
        max_batch_tiles: int,
        max_wait_ms: float,
        max_queued_tiles: int,
        max_queued_bytes: int,
        max_inflight: int = 2,
        on_pass: Callable[[int, float], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.run_pass = run_pass
        self.max_batch_tiles = max_batch_tiles
        self.max_wait = max_wait_ms / 1000
        self.max_queued_tiles = max_queued_tiles
        self.max_queued_bytes = max_queued_bytes
        self.max_inflight = max_inflight
        self._on_pass = on_pass
        self.on_fatal = on_fatal
        self._pending: deque[_Job[Piece]] = deque()
        self._queued_tiles = 0
        self._queued_bytes = 0
        self._inflight: deque[asyncio.Task[None]] = deque()
        self._inflight_passes: set[_Pass[Piece]] = set()
        self._wakeup = asyncio.Event()
        self._launcher = started_pool(1, "vit-launch")
        self._waiter = started_pool(1, "vit-wait")
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._failure: EngineFailed | None = None
        self._passes_started = 0  # the id of the last pass (spans name passes by it)

    @property
    def queued_tiles(self) -> int:
        return self._queued_tiles

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def idle(self) -> bool:
        """Nothing queued and no pass being launched or on the device."""
        return not self._pending and not self._inflight_passes

    @property
    def failure(self) -> EngineFailed | None:
        """Why the batcher stopped serving for good (None while it serves)."""
        return self._failure

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="tile-batcher")
            self._loop_task.add_done_callback(self._loop_ended)

    async def stop(self) -> None:
        """Refuse new work, fail what is queued, and stop the loop."""
        self._closing = True
        self._fail_queued(ShuttingDown("vision service is shutting down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.wait({self._loop_task})  # however it ended (a dead loop raised)
        if self._failure is not None:
            # A failed device may never finish what it was given: do not wait for it.
            self._launcher.shutdown(wait=False, cancel_futures=True)
            self._waiter.shutdown(wait=False, cancel_futures=True)
            return
        # In-flight passes finish (their images are delivered) before the threads go.
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self._launcher.shutdown(wait=True)
        self._waiter.shutdown(wait=True)

    async def submit(
        self, tiles: torch.Tensor, want: Any = None, request_id: str = ""
    ) -> tuple[list[Piece], BatchStats]:
        """Queue one image's tiles; wait for their outputs (one piece per pass, in order)."""
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise ShuttingDown("vision service is shutting down")
        count = int(tiles.shape[0])
        if count == 0:
            raise ValueError("an image has at least one tile")
        bytes_per_tile = tiles[0].numel() * tiles.element_size()
        self.check_room(count, count * bytes_per_tile)
        loop = asyncio.get_running_loop()
        job: _Job[Piece] = _Job(
            request_id, tiles, want, loop.create_future(), time.perf_counter(), bytes_per_tile
        )
        self._pending.append(job)
        self._count_queued(job, count)
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The caller is gone: drop whatever of this image has not been encoded yet.
            self._drop(job)
            raise

    def check_room(self, tiles: int, nbytes: int) -> None:
        """Raise ``Overloaded`` unless ``tiles`` more tiles of ``nbytes`` bytes in all fit in
        the queue now. ``submit`` checks each image exactly; callers may check a bound first,
        before they spend any work on a call the queue would refuse."""
        if self._queued_tiles + tiles > self.max_queued_tiles:
            raise Overloaded(
                f"vision queue is full ({self._queued_tiles} tiles waiting, limit "
                f"{self.max_queued_tiles}); retry later"
            )
        if self._queued_bytes + nbytes > self.max_queued_bytes:
            raise Overloaded(
                f"vision queue is full ({self._queued_bytes} bytes of tiles waiting, limit "
                f"{self.max_queued_bytes}); retry later"
            )

    # ---- queue bookkeeping --------------------------------------------------------------------

    def _count_queued(self, job: _Job[Piece], tiles: int) -> None:
        self._queued_tiles += tiles
        self._queued_bytes += tiles * job.bytes_per_tile

    def _drop(self, job: _Job[Piece]) -> None:
        """Remove ``job`` from the queue (if queued) and forget its tiles still waiting."""
        if job in self._pending:
            self._pending.remove(job)
            self._count_queued(job, -job.remaining)
            job.next_tile = job.num_tiles

    def _fail_queued(self, error: VisionError) -> None:
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(error)
        self._queued_tiles = 0
        self._queued_bytes = 0

    def _take_pass(self) -> list[tuple[_Job[Piece], int, int]]:
        """Pop up to max_batch_tiles tiles from the head of the queue: (job, start, end)."""
        taken: list[tuple[_Job[Piece], int, int]] = []
        room = self.max_batch_tiles
        while self._pending and room > 0:
            job = self._pending[0]
            if job.future.done():  # cancelled or failed while queued
                self._pending.popleft()
                self._count_queued(job, -job.remaining)
                continue
            count = min(room, job.remaining)
            taken.append((job, job.next_tile, job.next_tile + count))
            job.next_tile += count
            room -= count
            self._count_queued(job, -count)
            if job.remaining == 0:
                self._pending.popleft()
        return taken

    # ---- the loop -------------------------------------------------------------------------------

    def _device_busy(self) -> bool:
        return any(not task.done() for task in self._inflight)

    async def _wait_for_pass(self) -> None:
        """Wait until a pass is worth running: the device idle, the pass full, or its oldest
        tile waited max_wait."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._pending[0].enqueued_at + self.max_wait
        while self._queued_tiles < self.max_batch_tiles:
            if not self._device_busy():
                return
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return
            if not self._pending:  # everything queued was cancelled meanwhile
                return

    def _launch(self, slices: list[PassSlice]) -> LaunchedPass[Piece]:
        return self.run_pass(slices)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        # Python 3.11's wait_for can swallow a cancellation that lands as its wait ends, so
        # the loop also stops on the flag that ``stop`` sets before it cancels.
        while not self._closing:
            # Never more than max_inflight passes queued on the device: waiting here lets the
            # next pass fill up while the device is busy.
            while len(self._inflight) >= self.max_inflight:
                await asyncio.wait({self._inflight[0]})
                self._inflight.popleft()
            await self._wait_for_pass()
            taken = self._take_pass()
            if not taken:
                continue
            self._passes_started += 1
            batch: _Pass[Piece] = _Pass(taken, time.perf_counter(), self._passes_started)
            slices = [PassSlice(job.tiles[start:end], job.want) for job, start, end in batch.slices]
            self._inflight_passes.add(batch)
            try:
                launched = await loop.run_in_executor(self._launcher, self._launch, slices)
            except Exception as exc:
                self._pass_failed(batch, exc)
                continue
            self._inflight.append(
                asyncio.create_task(self._finish(batch, launched), name="tile-pass")
            )

    async def _finish(self, batch: _Pass[Piece], launched: LaunchedPass[Piece]) -> None:
        try:
            pieces = await asyncio.get_running_loop().run_in_executor(self._waiter, launched.wait)
            if len(pieces) != len(batch.slices):
                raise RuntimeError(f"{len(pieces)} outputs for {len(batch.slices)} slices")
        except Exception as exc:
            self._pass_failed(batch, exc)
            self._wakeup.set()
            return
        except BaseException as exc:  # cancelled: the loop is going away
            self._pass_failed(batch, exc)
            raise
        self._inflight_passes.discard(batch)
        self._wakeup.set()  # the device may be idle now: a waiting pass need not wait longer
        finished = time.perf_counter()
        if self._on_pass is not None:
            self._on_pass(batch.num_tiles, finished - batch.started)
        for (job, start, end), piece in zip(batch.slices, pieces, strict=True):
            if job.future.done():  # the caller is gone, or an earlier pass of it failed
                continue
            if job.first_pass_at is None:
                job.first_pass_at = batch.started
            job.pieces.append(piece)
            job.encode_seconds += finished - batch.started
            if tracing.enabled():
                job.passes.append(
                    PassRecord(batch.pass_id, batch.started, finished, batch.num_tiles, end - start)
                )
            if end == job.num_tiles:
                stats = BatchStats(
                    queue_ms=(job.first_pass_at - job.enqueued_at) * 1000,
                    encode_ms=job.encode_seconds * 1000,
                    enqueued_at=job.enqueued_at,
                    first_pass_at=job.first_pass_at,
                    passes=tuple(job.passes),
                )
                job.future.set_result((job.pieces, stats))

    # ---- faults ---------------------------------------------------------------------------------

    def _pass_failed(self, batch: _Pass[Piece], exc: BaseException) -> None:
        """Fail the images of one pass (and the rest of them, if they were split)."""
        self._inflight_passes.discard(batch)
        fatal = is_fatal(exc)
        if isinstance(exc, Exception):
            logger.error(
                "vision forward pass of %d tiles failed%s",
                batch.num_tiles,
                " (fatal: the device is unusable)" if fatal else "",
                exc_info=exc,
            )
        error = pass_error(exc, batch.num_tiles)
        for job, _, _ in batch.slices:
            if not job.future.done():
                job.future.set_exception(error)
            self._drop(job)
        if fatal:
            self.die(exc)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and self._closing:
            return
        exc = task.exception() if not task.cancelled() else None
        self.die(exc or RuntimeError("the batching loop stopped"))

    def die(self, cause: BaseException) -> None:
        """Stop serving for good: fail everything queued or in flight, refuse what comes, and
        tell ``on_fatal``. Called for fatal pass errors and when the loop dies."""
        if self._failure is not None or self._closing:
            return
        logger.critical("vision engine failed, no longer serving: %r", cause)
        self._failure = EngineFailed(
            f"the vision encoder failed and this replica is restarting ({type(cause).__name__}); "
            "retry on another replica"
        )
        self._fail_queued(self._failure)
        for batch in list(self._inflight_passes):
            for job, _, _ in batch.slices:
                if not job.future.done():
                    job.future.set_exception(self._failure)
        self._inflight_passes.clear()
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()
        if self.on_fatal is not None:
            self.on_fatal(cause)

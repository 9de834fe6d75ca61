"""Dynamic batching of tiles across concurrent requests.

Each image is a job of N tiles. One loop packs queued tiles (several images, several
requests; a large image may be split across passes) into forward passes of at most
``max_batch_tiles``. A pass starts when it is full, or ``max_wait_ms`` after its oldest tile
was queued, or at once when the queue was already waiting while the previous pass ran.
Forward passes run one at a time on a dedicated thread, so the event loop keeps serving I/O.

Per-tile results are independent of what else shares the pass (tiles do not attend to each
other), so an image gets exactly the embeddings it gets alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from vision_server.errors import Overloaded, ShuttingDown

logger = logging.getLogger(__name__)

TileOutputs = TypeVar("TileOutputs")
Result = TypeVar("Result")


@dataclass
class BatchStats:
    """What happened to one image's tiles in the batcher."""

    queue_ms: float
    encode_ms: float


@dataclass
class _Job:
    request_id: str
    tiles: torch.Tensor  # [n, 3, H, W]
    future: asyncio.Future[tuple[list[object], BatchStats]]
    enqueued_at: float
    next_tile: int = 0
    outputs: list[object] = field(default_factory=list)
    first_pass_at: float | None = None
    encode_seconds: float = 0.0

    @property
    def remaining(self) -> int:
        return self.tiles.shape[0] - self.next_tile


class TileBatcher(Generic[TileOutputs]):
    """Packs tiles of concurrent images into shared forward passes.

    ``run_pass(tiles) -> per-pass outputs`` runs on the batcher's thread; ``split(outputs,
    sizes)`` cuts a pass's outputs into one piece per contributing slice. ``submit`` returns
    the pieces of one image in tile order.
    """

    def __init__(
        self,
        run_pass: Callable[[torch.Tensor], TileOutputs],
        split: Callable[[TileOutputs, list[int]], list[object]],
        *,
        max_batch_tiles: int,
        max_wait_ms: float,
        max_queued_tiles: int,
        on_pass: Callable[[int, float], None] | None = None,
    ) -> None:
        self._run_pass = run_pass
        self._split = split
        self.max_batch_tiles = max_batch_tiles
        self.max_wait = max_wait_ms / 1000
        self.max_queued_tiles = max_queued_tiles
        self._on_pass = on_pass
        self._pending: deque[_Job] = deque()
        self._queued_tiles = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vit")
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def queued_tiles(self) -> int:
        return self._queued_tiles

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="tile-batcher")

    async def stop(self) -> None:
        """Refuse new work, fail what is queued, and stop the loop."""
        self._closing = True
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown("vision service is shutting down"))
        self._queued_tiles = 0
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._executor.shutdown(wait=True)

    async def submit(
        self, tiles: torch.Tensor, request_id: str = ""
    ) -> tuple[list[object], BatchStats]:
        """Queue one image's tiles; wait for their outputs (one piece per pass, in order)."""
        if self._closing:
            raise ShuttingDown("vision service is shutting down")
        count = int(tiles.shape[0])
        if count == 0:
            raise ValueError("an image has at least one tile")
        if self._queued_tiles + count > self.max_queued_tiles:
            raise Overloaded(
                f"vision queue is full ({self._queued_tiles} tiles waiting, limit "
                f"{self.max_queued_tiles}); retry later"
            )
        loop = asyncio.get_running_loop()
        job = _Job(request_id, tiles, loop.create_future(), time.perf_counter())
        self._pending.append(job)
        self._queued_tiles += count
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The caller is gone: drop whatever of this image has not been encoded yet.
            if job in self._pending:
                self._pending.remove(job)
                self._queued_tiles -= job.remaining
            raise

    async def run_on_worker(self, function: Callable[..., Result], *args: Any) -> Result:
        """Run ``function`` on the batcher's thread, between forward passes (device work that
        belongs to one image, such as its routing)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _take_pass(self) -> list[tuple[_Job, int, int]]:
        """Pop up to max_batch_tiles tiles from the head of the queue: (job, start, end)."""
        taken: list[tuple[_Job, int, int]] = []
        room = self.max_batch_tiles
        while self._pending and room > 0:
            job = self._pending[0]
            if job.future.done():  # cancelled while queued
                self._pending.popleft()
                self._queued_tiles -= job.remaining
                continue
            count = min(room, job.remaining)
            taken.append((job, job.next_tile, job.next_tile + count))
            job.next_tile += count
            room -= count
            self._queued_tiles -= count
            if job.remaining == 0:
                self._pending.popleft()
        return taken

    async def _wait_for_pass(self) -> None:
        """Wait until a pass is worth running: full, or its oldest tile waited max_wait."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._pending[0].enqueued_at + self.max_wait
        while self._queued_tiles < self.max_batch_tiles:
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return

    def _concat_and_run(self, slices: list[torch.Tensor]) -> TileOutputs:
        # On the batcher's thread: copying tiles together is too slow for the event loop.
        tiles = slices[0] if len(slices) == 1 else torch.cat(slices)
        return self._run_pass(tiles)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_pass()
            taken = self._take_pass()
            if not taken:
                continue
            slices = [job.tiles[start:end] for job, start, end in taken]
            pass_tiles = sum(end - start for _, start, end in taken)
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._concat_and_run, slices)
                pieces = self._split(outputs, [end - start for _, start, end in taken])
            except Exception as exc:  # a failed pass fails the images in it, not the service
                logger.exception("vision forward pass of %d tiles failed", pass_tiles)
                for job, _, _ in taken:
                    if not job.future.done():
                        job.future.set_exception(exc)
                    if job in self._pending:
                        self._pending.remove(job)
                        self._queued_tiles -= job.remaining
                continue
            finished = time.perf_counter()
            if self._on_pass is not None:
                self._on_pass(pass_tiles, finished - started)
            for (job, _, end), piece in zip(taken, pieces, strict=True):
                if job.first_pass_at is None:
                    job.first_pass_at = started
                job.outputs.append(piece)
                job.encode_seconds += finished - started
                if end == job.tiles.shape[0] and not job.future.done():
                    stats = BatchStats(
                        queue_ms=(job.first_pass_at - job.enqueued_at) * 1000,
                        encode_ms=job.encode_seconds * 1000,
                    )
                    job.future.set_result((job.outputs, stats))

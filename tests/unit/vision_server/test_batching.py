"""The tile batcher under faults, with an injected ``run_pass`` (no model, no server).

Tiles are tiny uint8 tensors whose first pixel names them, so every test can tell which tiles
went through which pass and which image got what back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import pytest
import torch

from vision_server.batching import PassSlice, TileBatcher
from vision_server.errors import EncodeFailed, EncoderOutOfMemory, EngineFailed, Overloaded


def image(*names: int) -> torch.Tensor:
    """An image whose tiles are called ``names``: ``[len(names), 3, 2, 2]`` uint8."""
    tiles = torch.zeros(len(names), 3, 2, 2, dtype=torch.uint8)
    for i, name in enumerate(names):
        tiles[i] = name
    return tiles


class _Done:
    def __init__(self, pieces: list[list[int]], error: BaseException | None = None) -> None:
        self.pieces, self.error = pieces, error

    def wait(self) -> list[list[int]]:
        if self.error is not None:
            raise self.error
        return self.pieces


class FakeEncoder:
    """``run_pass`` that records every pass and fails those containing a poisoned tile."""

    def __init__(
        self,
        poisoned: dict[int, BaseException] | None = None,
        fail_in_wait: bool = False,
    ) -> None:
        self.poisoned = poisoned or {}
        self.fail_in_wait = fail_in_wait
        self.passes: list[list[int]] = []

    def __call__(self, slices: Sequence[PassSlice]) -> _Done:
        pieces = [[int(t) for t in s.tiles[:, 0, 0, 0]] for s in slices]
        self.passes.append([name for piece in pieces for name in piece])
        error = next(
            (self.poisoned[n] for piece in pieces for n in piece if n in self.poisoned), None
        )
        if error is not None and not self.fail_in_wait:
            raise error
        return _Done(pieces, error)


def batcher(
    run_pass: Callable[[Sequence[PassSlice]], _Done],
    max_batch_tiles: int = 4,
    **kwargs: object,
) -> TileBatcher[list[int]]:
    options: dict[str, object] = dict(
        max_batch_tiles=max_batch_tiles,
        max_wait_ms=50,
        max_queued_tiles=1000,
        max_queued_bytes=1 << 30,
    )
    options.update(kwargs)
    return TileBatcher(run_pass, **options)  # type: ignore[arg-type]


async def until(condition: Callable[[], object], what: str, limit_s: float = 60.0) -> None:
    """Poll ``condition`` on the event loop until it holds (a bounded wait for an event)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never {what}"
        await asyncio.sleep(0.005)


# Negative checks ("nothing else was launched") give a wrong launch this long to show up. A slow
# machine can only hide a bug behind it, never fail a correct batcher.
GRACE_S = 0.2

# A batch wait no test can sit out: a call that waited for it would never end within the test.
FOREVER_MS = 3_600_000


async def outcome(batcher: TileBatcher[list[int]], tiles: torch.Tensor) -> object:
    """The tile names an image got back (flattened over its passes), or the exception."""
    try:
        pieces, _ = await batcher.submit(tiles)
    except Exception as exc:
        return exc
    return [name for piece in pieces for name in piece]


def run(scenario: Callable[[], object]) -> object:
    return asyncio.run(asyncio.wait_for(scenario(), 30))  # type: ignore[arg-type]


@pytest.mark.parametrize("fail_in_wait", [False, True], ids=["launch", "wait"])
def test_a_failed_pass_fails_only_its_images_and_the_loop_keeps_serving(fail_in_wait):
    encoder = FakeEncoder({66: RuntimeError("boom")}, fail_in_wait=fail_in_wait)

    async def scenario() -> object:
        tiles = batcher(encoder, max_batch_tiles=4)
        tiles.start()
        # Pass 1 holds images a and b (poisoned), pass 2 image c: all queued together.
        a, b, c = image(1, 2), image(66, 3), image(4, 5, 6)
        results = await asyncio.gather(*(outcome(tiles, t) for t in (a, b, c)))
        later = await outcome(tiles, image(7))
        await tiles.stop()
        return results, later

    (a, b, c), later = run(scenario)
    assert encoder.passes[0] == [1, 2, 66, 3]
    assert isinstance(a, EncodeFailed) and isinstance(b, EncodeFailed)
    assert "RuntimeError: boom" in str(a) and "4 tiles" in str(a)
    assert c == [4, 5, 6]
    assert later == [7]


def test_an_image_split_across_passes_fails_when_any_of_its_passes_fails():
    encoder = FakeEncoder({12: RuntimeError("second half")})

    async def scenario() -> object:
        tiles = batcher(encoder, max_batch_tiles=3)
        tiles.start()
        # Image x is split: tiles 10, 11, 12 in pass 1 (12 poisoned), 13, 14 would be pass 2.
        x, y = image(10, 11, 12, 13, 14), image(20, 21)
        results = await asyncio.gather(outcome(tiles, x), outcome(tiles, y))
        later = await outcome(tiles, image(30, 31, 32, 33))
        await tiles.stop()
        return results, later, tiles.queued_tiles, tiles.queued_bytes

    (x, y), later, queued, queued_bytes = run(scenario)
    assert isinstance(x, EncodeFailed)
    # The failed image's remaining tiles were dropped, not encoded for nobody.
    assert [13, 14] not in [p[:2] for p in encoder.passes]
    assert all(13 not in p for p in encoder.passes)
    assert y == [20, 21]
    assert later == [30, 31, 32, 33]  # split over two passes
    assert (queued, queued_bytes) == (0, 0)


def test_an_image_whose_second_pass_fails_fails_and_its_neighbours_do_not():
    encoder = FakeEncoder({44: RuntimeError("late")})

    async def scenario() -> object:
        tiles = batcher(encoder, max_batch_tiles=2)
        tiles.start()
        # Passes: [40, 41] [42, 43] [44, 50] [51]: the long image fails in its third pass,
        # image 50-51 shares that pass and fails too; 60 comes afterwards.
        results = await asyncio.gather(
            outcome(tiles, image(40, 41, 42, 43, 44)), outcome(tiles, image(50, 51))
        )
        later = await outcome(tiles, image(60))
        await tiles.stop()
        return results, later

    (long_image, neighbour), later = run(scenario)
    assert encoder.passes[:3] == [[40, 41], [42, 43], [44, 50]]
    assert isinstance(long_image, EncodeFailed)
    assert isinstance(neighbour, EncodeFailed)
    assert later == [60]


def test_out_of_memory_is_resource_exhausted():
    encoder = FakeEncoder({9: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")})

    async def scenario() -> object:
        tiles = batcher(encoder)
        tiles.start()
        failed = await outcome(tiles, image(9, 8))
        fine = await outcome(tiles, image(8))
        await tiles.stop()
        return failed, fine

    failed, fine = run(scenario)
    assert isinstance(failed, EncoderOutOfMemory)
    assert failed.status.name == "RESOURCE_EXHAUSTED"
    assert "out of device memory" in str(failed)
    assert fine == [8]


@pytest.mark.parametrize("fail_in_wait", [False, True], ids=["launch", "wait"])
def test_a_broken_device_stops_the_batcher_for_good(fail_in_wait):
    fatal = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    encoder = FakeEncoder({99: fatal}, fail_in_wait=fail_in_wait)
    told: list[BaseException] = []

    async def scenario() -> object:
        tiles = batcher(encoder, max_batch_tiles=2, on_fatal=told.append)
        tiles.start()
        results = await asyncio.gather(*(outcome(tiles, t) for t in (image(99, 1), image(2, 3))))
        after = await outcome(tiles, image(4))
        await tiles.stop()
        return results, after

    (broken, queued), after = run(scenario)
    assert isinstance(broken, EncodeFailed)
    assert isinstance(queued, EngineFailed) and queued.status.name == "UNAVAILABLE"
    assert isinstance(after, EngineFailed)  # refused at once, nothing queued
    assert told == [fatal]
    assert all(4 not in p for p in encoder.passes)


def test_a_dead_loop_fails_pending_calls_and_reports_it():
    told: list[BaseException] = []

    async def scenario() -> object:
        tiles = batcher(FakeEncoder(), on_fatal=told.append, max_wait_ms=1000)

        async def broken_wait() -> None:
            await until(lambda: tiles.queued_tiles, "queued an image")  # one call is pending
            raise KeyError("a bug in the loop")

        tiles._wait_for_pass = broken_wait  # type: ignore[method-assign]
        tiles.start()
        waiting = await outcome(tiles, image(1))
        after = await outcome(tiles, image(2))
        await tiles.stop()
        return waiting, after

    waiting, after = run(scenario)
    assert isinstance(waiting, EngineFailed)
    assert isinstance(after, EngineFailed)
    assert len(told) == 1 and isinstance(told[0], KeyError)


class _Gate:
    """A pass whose ``wait`` blocks until ``release``: the device stays busy meanwhile."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.passes: list[list[int]] = []

    def __call__(self, slices: Sequence[PassSlice]) -> _Held:
        pieces = [[int(t) for t in s.tiles[:, 0, 0, 0]] for s in slices]
        self.passes.append([name for piece in pieces for name in piece])
        return _Held(pieces, self.event)


class _Held(_Done):
    def __init__(self, pieces: list[list[int]], event: threading.Event) -> None:
        super().__init__(pieces)
        self.event = event

    def wait(self) -> list[list[int]]:
        self.event.wait(10)
        return self.pieces


def test_an_idle_device_gets_a_pass_at_once_and_a_busy_one_gets_it_filled():
    """Idle: a lone image is launched without the batch wait. Busy: later images wait (up to
    max_wait) and share a pass, launched as soon as the device is idle again. The batch wait
    is an hour: any call that sat it out would never finish here."""
    gate = _Gate()

    async def scenario() -> object:
        tiles = batcher(gate, max_wait_ms=FOREVER_MS, max_batch_tiles=8)
        tiles.start()
        first = asyncio.create_task(outcome(tiles, image(1)))
        await until(lambda: gate.passes, "launched the lone image")
        launched_alone = list(gate.passes)
        second = asyncio.create_task(outcome(tiles, image(2)))
        await until(lambda: tiles.queued_tiles == 1, "queued the second image")
        third = asyncio.create_task(outcome(tiles, image(3, 4)))
        await until(lambda: tiles.queued_tiles == 3, "queued the third image")
        await asyncio.sleep(GRACE_S)  # a negative check: no pass while the device is busy
        held = (list(gate.passes), tiles.queued_tiles)
        gate.event.set()  # the first pass ends: the device is idle, the queued pass goes now
        results = await asyncio.gather(first, second, third)
        await tiles.stop()
        return launched_alone, held, results, list(gate.passes)

    launched_alone, held, results, passes = run(scenario)
    assert launched_alone == [[1]]  # not after an hour of waiting for company
    assert held == ([[1]], 3)  # queued while the device is busy
    assert results == [[1], [2], [3, 4]]
    assert passes == [[1], [2, 3, 4]]


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_passes_in_flight_bounds_the_passes_queued_on_a_busy_device(in_flight):
    """While the device holds its passes, exactly ``max_inflight`` are launched; the rest of
    the queue waits, and goes as soon as the device lets them."""
    gate = _Gate()

    async def scenario() -> object:
        tiles = batcher(gate, max_batch_tiles=1, max_wait_ms=0, max_inflight=in_flight)
        tiles.start()
        images = [asyncio.create_task(outcome(tiles, image(n))) for n in range(1, 6)]
        await until(lambda: len(gate.passes) >= in_flight, f"launched {in_flight} passes")
        await asyncio.sleep(GRACE_S)  # a negative check: no more while the device holds them
        launched = list(gate.passes)
        gate.event.set()
        results = await asyncio.gather(*images)
        await tiles.stop()
        return launched, results

    launched, results = run(scenario)
    assert launched == [[n] for n in range(1, in_flight + 1)]
    assert results == [[n] for n in range(1, 6)]


def test_cancelled_caller_frees_its_queue_space():
    gate = _Gate()

    async def scenario() -> object:
        tiles = batcher(gate, max_wait_ms=FOREVER_MS, max_batch_tiles=64)
        tiles.start()
        busy = asyncio.create_task(outcome(tiles, image(9)))  # keeps the device busy
        await until(lambda: gate.passes, "launched the busy pass")
        waiting = asyncio.create_task(tiles.submit(image(1, 2, 3)))
        await until(lambda: tiles.queued_tiles == 3, "queued the waiting image")
        before = (tiles.queued_tiles, tiles.queued_bytes)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        after = (tiles.queued_tiles, tiles.queued_bytes)
        gate.event.set()
        await busy
        await tiles.stop()
        return before, after

    before, after = run(scenario)
    assert before == (3, 3 * 12)
    assert after == (0, 0)
    assert gate.passes == [[9]]  # the cancelled image was never encoded


def test_queue_limit_in_bytes():
    async def scenario() -> object:
        # Room for 5 tiles by count, 3 by bytes (12 bytes each).
        tiles = batcher(FakeEncoder(), max_queued_tiles=5, max_queued_bytes=36)
        # Not started: whatever is submitted stays queued.
        first = asyncio.create_task(tiles.submit(image(1, 2)))
        await asyncio.sleep(0)
        refused = await outcome(tiles, image(3, 4))
        fits = asyncio.create_task(tiles.submit(image(5)))
        await asyncio.sleep(0)
        queued = (tiles.queued_tiles, tiles.queued_bytes)
        first.cancel()
        fits.cancel()
        await asyncio.gather(first, fits, return_exceptions=True)
        return refused, queued

    refused, queued = run(scenario)
    assert isinstance(refused, Overloaded)
    assert "bytes" in str(refused) and "limit 36" in str(refused)
    assert queued == (3, 36)

"""Admission before work on the vision side: a call that the tile queue cannot take is refused
before any of its images is decoded, and the exact per-image check still holds at submit time.

In-process, on the tiny checkpoint: the real pipeline and engine, with a batcher that is not
started, so that whatever is submitted stays queued and the queue can be filled at will.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import encode_image, encode_video, grey_level_frames, noise_image
from pydantic import ValidationError

from protos.messages import EncodeCall, ImageInput, VideoInput
from vision_server.batching import TileBatcher
from vision_server.errors import Overloaded
from vision_server.pipeline import VisionPipeline
from vision_server.settings import VisionSettings

TILE_BYTES = 3 * 448 * 448  # one uint8 RGB tile


@pytest.fixture(scope="module")
def vision_pipeline(tiny_models: dict[str, Path]):
    from vision_server.server import build_pipeline
    from vision_server.settings import VisionSettings

    settings = VisionSettings(model=str(tiny_models["hf"]))  # type: ignore[call-arg]
    pipeline, _ = build_pipeline(settings)
    yield pipeline
    pipeline.close()


@pytest.fixture
def decodes(vision_pipeline: VisionPipeline, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images the pipeline hands to its media workers, one entry per image (in
    one piece or in parts)."""
    calls: list[int] = []
    prepare = vision_pipeline.media.prepare_image

    async def counted(data: bytes, *args: Any) -> Any:
        calls.append(len(data))
        return await prepare(data, *args)

    monkeypatch.setattr(vision_pipeline.media, "prepare_image", counted)
    return calls


def _fresh_batcher(pipeline: VisionPipeline, max_queued_tiles: int, max_queued_bytes: int) -> None:
    # A batcher per event loop (each test drives the engine from asyncio.run), with the limits
    # under test.
    engine = pipeline.engine
    engine.batcher = TileBatcher(
        engine.run_pass,
        max_batch_tiles=8,
        max_wait_ms=0,
        max_queued_tiles=max_queued_tiles,
        max_queued_bytes=max_queued_bytes,
    )


async def _fill(pipeline: VisionPipeline, tiles: int) -> asyncio.Task[Any]:
    """Queue ``tiles`` tiles of another request (the batcher is not started: they stay)."""
    task = asyncio.create_task(
        pipeline.engine.batcher.submit(torch.zeros(tiles, 3, 448, 448, dtype=torch.uint8))
    )
    await asyncio.sleep(0)
    assert pipeline.engine.batcher.queued_tiles == tiles
    return task


async def _encode(pipeline: VisionPipeline, call: EncodeCall) -> list[Any]:
    async def run() -> list[Any]:
        return [encoded async for encoded in pipeline.encode(call)]

    # Bounded: without admission a call can wait in the stopped batcher's queue for good.
    return await asyncio.wait_for(run(), timeout=30)


async def _drain(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


IMAGE = encode_image(noise_image(900, 600, seed=3))  # 6 tiles + thumbnail at max_tiles 12


def test_a_full_queue_refuses_before_decoding(vision_pipeline, decodes):
    """Room for 6 tiles; the call can make up to 2 x (12 + thumbnail) = 26: refused with
    RESOURCE_EXHAUSTED and no image decoded."""

    async def scenario() -> Overloaded:
        _fresh_batcher(vision_pipeline, max_queued_tiles=64, max_queued_bytes=1 << 40)
        other = await _fill(vision_pipeline, 58)
        try:
            with pytest.raises(Overloaded) as refused:
                await _encode(vision_pipeline, EncodeCall([ImageInput(IMAGE)] * 2))
            assert vision_pipeline.engine.batcher.queued_tiles == 58  # nothing of it queued
            return refused.value
        finally:
            await _drain(other)

    refused = asyncio.run(scenario())
    assert decodes == []
    assert refused.status.name == "RESOURCE_EXHAUSTED"
    assert "58 tiles waiting, limit 64" in str(refused)


def test_the_bound_counts_bytes_too(vision_pipeline, decodes):
    """Room for plenty of tiles by count but only 10 tiles' worth of bytes; one image at
    max_tiles 12 may make 13 tiles: refused before decoding (this one would make 7)."""

    async def scenario() -> Overloaded:
        _fresh_batcher(vision_pipeline, max_queued_tiles=1000, max_queued_bytes=20 * TILE_BYTES)
        other = await _fill(vision_pipeline, 10)
        try:
            with pytest.raises(Overloaded) as refused:
                await _encode(vision_pipeline, EncodeCall([ImageInput(IMAGE)]))
            return refused.value
        finally:
            await _drain(other)

    refused = asyncio.run(scenario())
    assert decodes == []
    assert "bytes of tiles waiting" in str(refused)


def test_the_bound_follows_each_image_max_tiles(vision_pipeline, decodes):
    """The same queue admits the call once its images may make fewer tiles: with max_tiles 2
    an image makes at most 2 + thumbnail, 6 for two images, which fits the room of 6; the
    images are decoded and, the batcher being stopped, queued."""

    async def scenario() -> int:
        _fresh_batcher(vision_pipeline, max_queued_tiles=64, max_queued_bytes=1 << 40)
        other = await _fill(vision_pipeline, 58)
        call = EncodeCall([ImageInput(IMAGE, max_tiles=2)] * 2)
        encoding = asyncio.create_task(_encode(vision_pipeline, call))
        try:
            for _ in range(200):  # bounded: decoding two small images takes well under 2 s
                if vision_pipeline.engine.batcher.queued_tiles > 58:
                    break
                await asyncio.sleep(0.01)
            return vision_pipeline.engine.batcher.queued_tiles
        finally:
            await _drain(encoding)
            await _drain(other)

    queued = asyncio.run(scenario())
    assert len(decodes) == 2
    assert queued == 58 + 2 * 3  # each image: 2 tiles (2x1 grid) + thumbnail


def test_an_idle_queue_admits_a_call_whose_bound_exceeds_it(vision_pipeline, decodes):
    """The bound is capped by the queue's size: a queue of 8 tiles still serves a request of
    one small image (1 tile) asked at max_tiles 12, whose bound (13) is more than the whole
    queue; the exact check at submit time is what applies."""
    small = encode_image(noise_image(300, 300, seed=4))

    async def scenario() -> list[Any]:
        _fresh_batcher(vision_pipeline, max_queued_tiles=8, max_queued_bytes=1 << 40)
        vision_pipeline.engine.start()
        try:
            return await _encode(vision_pipeline, EncodeCall([ImageInput(small)]))
        finally:
            await vision_pipeline.engine.batcher.stop()

    encoded = asyncio.run(scenario())
    assert len(decodes) == 1
    assert [len(image.tokens_per_tile) for image in encoded] == [1]


def test_the_exact_check_still_refuses_at_submit_time(vision_pipeline, decodes):
    """With an idle queue of 8 tiles, an image that really makes 13 tiles is admitted by the
    bound (capped at the queue's size), decoded, then refused by the exact check when its
    tiles are submitted."""
    large = encode_image(noise_image(1400, 1000, seed=5))  # 12 tiles + thumbnail

    async def scenario() -> None:
        _fresh_batcher(vision_pipeline, max_queued_tiles=8, max_queued_bytes=1 << 40)
        with pytest.raises(Overloaded, match="limit 8"):
            await _encode(vision_pipeline, EncodeCall([ImageInput(large)]))

    asyncio.run(scenario())
    assert len(decodes) == 1


def test_video_frames_count_in_the_bound(vision_pipeline, decodes, monkeypatch):
    """A video's frames are tiles too (one each): with room for 6 tiles, a call of one video
    at 8 frames is refused before the video is opened, and so is an image next to it."""
    opened: list[int] = []

    async def counting_video(data: bytes, *args: Any) -> Any:
        opened.append(len(data))
        raise AssertionError("the video was decoded")

    monkeypatch.setattr(vision_pipeline.media, "prepare_video", counting_video)
    video = VideoInput(encode_video(grey_level_frames(16)), num_frames=8)

    async def scenario() -> list[Overloaded]:
        _fresh_batcher(vision_pipeline, max_queued_tiles=64, max_queued_bytes=1 << 40)
        other = await _fill(vision_pipeline, 58)
        refusals = []
        try:
            for call in (
                EncodeCall([], videos=[video]),
                EncodeCall([ImageInput(IMAGE, max_tiles=1)], videos=[video]),
            ):
                with pytest.raises(Overloaded) as refused:
                    await _encode(vision_pipeline, call)
                refusals.append(refused.value)
            return refusals
        finally:
            await _drain(other)

    refusals = asyncio.run(scenario())
    assert opened == [] and decodes == []
    assert all(r.status.name == "RESOURCE_EXHAUSTED" for r in refusals)


def test_a_queue_too_small_for_the_largest_image_is_refused_at_start():
    """An image of max_tiles_limit tiles plus its thumbnail must fit in an empty queue, or an
    idle service would answer it 'retry later' forever."""
    with pytest.raises(ValidationError, match="must hold the largest image"):
        VisionSettings(model="m", max_queued_tiles=40, max_tiles_limit=40)  # type: ignore[call-arg]
    VisionSettings(model="m", max_queued_tiles=41, max_tiles_limit=40)  # type: ignore[call-arg]

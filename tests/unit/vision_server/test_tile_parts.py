"""Images cut in parts: while the encoder is idle, an image's grid and thumbnail are cut on two
threads and each part is encoded as soon as it is cut (``--overlap-preparation``). The image
must get the rows and router decisions it gets in one piece (bit for bit),
whatever order the parts finish in; under load an image is prepared in one piece; a call that
fails drops the cuts it started.

Real encoder (the tiny Flash checkpoint, on the CPU), real batcher, real preprocessing (in
the media worker processes).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import encode_image, noise_image

from protos.messages import EncodeCall, EncodeOptions, ImageInput
from protos.options import VirMode
from vision_server.batching import TileBatcher
from vision_server.engine import EncodedItem, TileParts
from vision_server.errors import TooManyItems
from vision_server.pipeline import VisionPipeline
from vision_server.preprocess import ImageLimits, TilingOptions, prepare_image

SQUARE = encode_image(noise_image(896, 896, seed=11))  # 2x2 grid as it is + thumbnail
WIDE = encode_image(noise_image(900, 600, seed=12))  # resized to a 3x2 grid + thumbnail
SMALL = encode_image(noise_image(300, 300, seed=13))  # one tile, no thumbnail: one part


@pytest.fixture(scope="module")
def flash_pipeline(tiny_flash_models: dict[str, Path]):
    from vision_server.server import build_pipeline
    from vision_server.settings import VisionSettings

    settings = VisionSettings(  # type: ignore[call-arg]
        model=str(tiny_flash_models["hf"]), overlap_preparation="on", embedding_cache_mb=0
    )
    pipeline, _ = build_pipeline(settings)
    assert pipeline.overlap_preparation
    yield pipeline
    pipeline.close()


def _fresh_batcher(pipeline: VisionPipeline, passes: list[int] | None = None) -> TileBatcher[Any]:
    """A batcher per event loop (each test drives the engine from its own asyncio.run); the
    tile count of each pass it runs goes into ``passes``."""
    engine = pipeline.engine
    engine.batcher = TileBatcher(
        engine.run_pass,
        max_batch_tiles=8,
        max_wait_ms=0,
        max_queued_tiles=256,
        max_queued_bytes=1 << 40,
        on_pass=None if passes is None else lambda tiles, _: passes.append(tiles),
    )
    return engine.batcher


def _count_submits(batcher: TileBatcher[Any], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tile count of every job submitted to ``batcher``."""
    sizes: list[int] = []
    submit = batcher.submit

    async def counted(tiles: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(int(tiles.shape[0]))
        return await submit(tiles, *args, **kwargs)

    monkeypatch.setattr(batcher, "submit", counted)
    return sizes


async def _encode(pipeline: VisionPipeline, call: EncodeCall) -> list[Any]:
    async def run() -> list[EncodedItem]:
        return [encoded async for encoded in pipeline.encode(call)]

    return await asyncio.wait_for(run(), timeout=60)  # bounded: a stuck call fails the test


@pytest.mark.parametrize("vir", [VirMode.OFF, VirMode.AUTO, VirMode.MAX])
def test_parts_encode_exactly_as_one_piece(flash_pipeline, monkeypatch, vir):
    """One request of three images, in parts and in one piece: the same rows, the same tokens
    per tile (router decisions) and grids. In parts, each multi-tile image goes to the batcher
    as two jobs (grid, thumbnail) and the one-tile image as one."""
    images = [ImageInput(SQUARE), ImageInput(WIDE), ImageInput(SMALL)]
    call = EncodeCall(images, (), EncodeOptions(vir=vir))

    async def scenario(in_parts: bool) -> tuple[list[EncodedItem], list[int]]:
        batcher = _fresh_batcher(flash_pipeline)
        sizes = _count_submits(batcher, monkeypatch)
        monkeypatch.setattr(flash_pipeline, "overlap_preparation", in_parts)
        flash_pipeline.engine.start()
        try:
            return await _encode(flash_pipeline, call), sizes
        finally:
            await flash_pipeline.engine.batcher.stop()

    parts, part_sizes = asyncio.run(scenario(True))
    whole, whole_sizes = asyncio.run(scenario(False))
    assert sorted(part_sizes) == sorted([4, 1, 6, 1, 1])
    assert whole_sizes == [5, 7, 1]
    assert len(parts) == len(whole) == 3
    for in_parts, in_one in zip(parts, whole, strict=True):
        assert in_parts.grid == in_one.grid
        assert in_parts.tokens_per_tile == in_one.tokens_per_tile
        assert_same_rows(in_parts, in_one)


def assert_same_rows(got: EncodedItem, expected: EncodedItem) -> None:
    """The same rows bit for bit: parts change which tiles share a pass, and a tile's bits do
    not depend on that (batch invariance, vision_server.invariance)."""
    assert got.embeddings.dtype == expected.embeddings.dtype
    assert torch.equal(got.embeddings, expected.embeddings)


def test_a_thumbnail_cut_first_still_lands_last(flash_pipeline):
    """The thumbnail is cut and encoded before the grid (a pass of its own); the image's rows
    are still the grid's, then the thumbnail's, exactly as in one piece."""
    options = TilingOptions(max_tiles=flash_pipeline.spec.max_tiles)
    prepared = prepare_image(SQUARE, ImageLimits(), options)
    grid_tiles, thumbnail = prepared.tiles[:-1], prepared.tiles[-1:]
    passes: list[int] = []

    async def scenario() -> tuple[EncodedItem, EncodedItem]:
        _fresh_batcher(flash_pipeline, passes)
        engine = flash_pipeline.engine
        engine.start()
        try:
            loop = asyncio.get_running_loop()
            grid_cut: asyncio.Future[torch.Tensor] = loop.create_future()
            thumbnail_cut: asyncio.Future[torch.Tensor] = loop.create_future()
            stream = engine.encode_request(
                [TileParts([grid_cut, thumbnail_cut], prepared.grid)], vir_mode=VirMode.OFF
            )
            first = asyncio.ensure_future(anext(stream))
            thumbnail_cut.set_result(thumbnail)
            for _ in range(600):  # bounded: a one-tile pass of the tiny model takes ms
                if passes:
                    break
                await asyncio.sleep(0.01)
            assert passes == [1]  # the thumbnail's pass ran before the grid was cut
            grid_cut.set_result(grid_tiles)
            in_parts = await asyncio.wait_for(first, timeout=60)
            await stream.aclose()
            whole = engine.encode_request([prepared], vir_mode=VirMode.OFF)
            in_one = await asyncio.wait_for(anext(whole), timeout=60)
            await whole.aclose()
            return in_parts, in_one
        finally:
            await engine.batcher.stop()

    in_parts, in_one = asyncio.run(scenario())
    assert passes == [1, 4, 5]
    assert in_parts.tokens_per_tile == in_one.tokens_per_tile
    assert torch.equal(in_parts.embeddings, in_one.embeddings)  # vir off: 256-token rows only


def test_under_load_an_image_is_prepared_in_one_piece(flash_pipeline, monkeypatch):
    """With tiles of another request already queued, the encoder is not idle: the image is
    decoded and cut in one piece, and queued as one job."""
    decoded: list[str] = []
    prepare = flash_pipeline.media.prepare_image

    async def spied(data: bytes, options: Any, in_parts: bool = False) -> Any:
        decoded.append("in parts" if in_parts else "one piece")
        return await prepare(data, options, in_parts)

    monkeypatch.setattr(flash_pipeline.media, "prepare_image", spied)

    async def scenario() -> list[int]:
        batcher = _fresh_batcher(flash_pipeline)  # not started: what is queued stays queued
        other = asyncio.ensure_future(
            batcher.submit(torch.zeros(3, 3, 448, 448, dtype=torch.uint8))
        )
        await asyncio.sleep(0)
        assert not batcher.idle
        sizes = _count_submits(batcher, monkeypatch)
        call = asyncio.ensure_future(_encode(flash_pipeline, EncodeCall([ImageInput(SQUARE)])))
        try:
            for _ in range(600):  # bounded: decoding one small image takes well under 6 s
                if batcher.queued_tiles > 3:
                    break
                await asyncio.sleep(0.01)
            return sizes
        finally:
            for task in (call, other):
                task.cancel()
            await asyncio.gather(call, other, return_exceptions=True)
            await batcher.stop()

    sizes = asyncio.run(scenario())
    assert decoded == ["one piece"]
    assert sizes == [5]


def test_a_refused_call_drops_the_cuts_it_started(flash_pipeline, monkeypatch):
    """The tile count is known only after decoding: a call over the per-request limit is
    refused then, and the cuts it started are cancelled or finished, none left pending."""
    started: list[TileParts] = []
    prepare = flash_pipeline.media.prepare_image

    async def spied(data: bytes, options: Any, in_parts: bool = False) -> Any:
        prepared = await prepare(data, options, in_parts)
        if isinstance(prepared, TileParts):
            started.append(prepared)
        return prepared

    monkeypatch.setattr(flash_pipeline.media, "prepare_image", spied)
    monkeypatch.setattr(flash_pipeline.settings, "max_tiles_per_request", 6)

    async def scenario() -> None:
        _fresh_batcher(flash_pipeline)
        flash_pipeline.engine.start()
        try:
            with pytest.raises(TooManyItems, match="make 7 tiles"):
                # Admission allows it (its bound is capped by the limit); decoding says 7.
                await _encode(flash_pipeline, EncodeCall([ImageInput(WIDE)]))
            await asyncio.sleep(0)
            assert len(started) == 1
            assert all(part.done() for part in started[0].parts)  # type: ignore[attr-defined]
        finally:
            await flash_pipeline.engine.batcher.stop()

    asyncio.run(scenario())

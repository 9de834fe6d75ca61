"""The vision service's embedding cache, in process: hits are bit-identical to misses (every
router mode, multi-image routed requests included), every input that changes the rows is a
miss, concurrent requests encode once, and the byte bound holds. Videos are never cached, and
under vir=auto a request with a video neither reads nor writes routed rows (its frames are
routed with its images).

The reference for "bit-identical" is the same checkpoint encoded by a pipeline without a
cache; a hit must equal it exactly (``torch.equal``), not approximately.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    encode_image,
    encode_video,
    grey_level_frames,
    noise_image,
    same_pixels_other_file,
)
from PIL import Image

from protos.messages import EncodeCall, EncodeOptions, ImageInput, VideoInput, VisualEmbedding
from protos.options import VirMode
from vision_server.batching import TileBatcher
from vision_server.embedding_cache import EmbeddingCache
from vision_server.errors import InvalidImage
from vision_server.pipeline import VisionPipeline


def stripes(width: int, height: int, regions: list[tuple[int, int]]) -> bytes:
    """A flat grey image with dense vertical stripes in the given x-ranges: the router keeps
    the striped tiles and compresses the flat ones."""
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    for start, end in regions:
        columns = np.arange(start, end)
        pixels[:, start:end] = np.where((columns // 2) % 2 == 0, 255, 0)[None, :, None]
    return encode_image(Image.fromarray(pixels))


MIXED = stripes(1344, 448, [(448, 896)])  # flat | stripes | flat (+ thumbnail)
ONE_TILE = encode_image(noise_image(448, 448, seed=5))  # compressed only next to MIXED
OTHER = encode_image(noise_image(700, 300, seed=11))
VIDEO = encode_video(grey_level_frames(8))  # changes how MIXED is routed under vir=auto
VIDEO_FRAMES = 4
OFF = EncodeOptions(vir=VirMode.OFF)


def build(model: Path, cache_mb: int) -> VisionPipeline:
    from vision_server.server import build_pipeline
    from vision_server.settings import VisionSettings

    settings = VisionSettings(model=str(model), embedding_cache_mb=cache_mb)  # type: ignore[call-arg]
    pipeline, _ = build_pipeline(settings)
    return pipeline


@pytest.fixture(scope="module")
def cached(tiny_flash_models) -> VisionPipeline:
    pipeline = build(tiny_flash_models["hf"], cache_mb=64)
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def uncached(tiny_flash_models) -> VisionPipeline:
    pipeline = build(tiny_flash_models["hf"], cache_mb=0)
    assert pipeline.cache is None
    yield pipeline
    pipeline.close()


class TileCounter:
    """Wraps the engine's pass launcher: counts the tiles that really go through the ViT."""

    def __init__(self, pipeline: VisionPipeline) -> None:
        self.run_pass = pipeline.engine.run_pass
        self.tiles = 0

    def __call__(self, slices):  # type: ignore[no-untyped-def]
        self.tiles += sum(int(piece.tiles.shape[0]) for piece in slices)
        return self.run_pass(slices)


async def collect(pipeline: VisionPipeline, call: EncodeCall) -> list[VisualEmbedding]:
    return [encoded async for encoded in pipeline.encode(call)]


def run(pipeline: VisionPipeline, scenario) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    """Run ``scenario()`` (a coroutine function) on a fresh event loop with a fresh batcher;
    returns its result and the tiles encoded meanwhile."""
    counter = TileCounter(pipeline)
    engine = pipeline.engine
    engine.batcher = TileBatcher(
        counter, max_batch_tiles=8, max_wait_ms=5, max_queued_tiles=4096, max_queued_bytes=1 << 32
    )

    async def main():  # type: ignore[no-untyped-def]
        engine.start()
        try:
            return await scenario()
        finally:
            await engine.batcher.stop()

    return asyncio.run(main()), counter.tiles


def encode(
    pipeline: VisionPipeline,
    images: Sequence[bytes],
    vir: VirMode | None = None,
    max_tiles: int = 0,
    threshold: float | None = None,
    videos: Sequence[bytes] = (),
) -> list[VisualEmbedding]:
    call = EncodeCall(
        [ImageInput(data) for data in images],
        [VideoInput(data, num_frames=VIDEO_FRAMES) for data in videos],
        EncodeOptions(max_tiles=max_tiles or None, vir=vir, vir_threshold=threshold),
    )
    result, _ = run(pipeline, lambda: collect(pipeline, call))
    return result  # type: ignore[return-value]


def assert_identical(got: list[VisualEmbedding], expected: list[VisualEmbedding]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.tokens_per_tile == b.tokens_per_tile
        assert a.grid == b.grid and a.vir == b.vir
        assert a.embeddings.dtype == b.embeddings.dtype
        assert torch.equal(a.embeddings, b.embeddings)


@pytest.mark.parametrize(
    ("images", "vir"),
    [
        ([MIXED], VirMode.OFF),
        ([MIXED], VirMode.MAX),
        ([MIXED], VirMode.AUTO),
        ([MIXED, ONE_TILE], VirMode.AUTO),
        ([OTHER, MIXED], VirMode.OFF),
    ],
)
def test_a_hit_is_bit_identical_to_a_miss(cached, uncached, images, vir):
    images = [same_pixels_other_file(data, f"{vir}-{len(images)}") for data in images]
    miss = encode(cached, images, vir)
    hit = encode(cached, images, vir)
    reference = encode(uncached, images, vir)
    assert not any(e.from_cache for e in miss)
    assert all(e.from_cache for e in hit)
    assert all(e.encode_ms == 0 for e in hit)
    assert_identical(miss, reference)
    assert_identical(hit, reference)
    if vir is VirMode.AUTO:  # the router really decided something
        tokens = {t for e in hit for t in e.tokens_per_tile}
        assert tokens == {64, 256}


def test_routed_rows_are_keyed_by_the_whole_request(cached, uncached):
    """Under vir=auto an image's rows depend on its company: the same set of images hits in
    any order, the image alone does not (and gets the rows it gets alone)."""
    mixed, one = (same_pixels_other_file(d, "context") for d in (MIXED, ONE_TILE))
    together = encode(cached, [mixed, one], VirMode.AUTO)
    assert together[1].tokens_per_tile == [64]  # compressed next to the striped image
    swapped = encode(cached, [one, mixed], VirMode.AUTO)
    assert all(e.from_cache for e in swapped)
    assert_identical(swapped, [together[1], together[0]])
    assert_identical(swapped, encode(uncached, [one, mixed], VirMode.AUTO))
    (alone,) = encode(cached, [one], VirMode.AUTO)
    assert not alone.from_cache
    assert alone.tokens_per_tile == [256]  # a one-tile image alone is never compressed
    assert_identical([alone], encode(uncached, [one], VirMode.AUTO))
    (again,) = encode(cached, [one], VirMode.AUTO)
    assert again.from_cache and torch.equal(again.embeddings, alone.embeddings)


def test_anything_that_changes_the_rows_is_a_miss(cached, tiny_models):
    base = same_pixels_other_file(MIXED, "misses")
    (first,) = encode(cached, [base], VirMode.AUTO)
    assert not first.from_cache
    assert encode(cached, [base], VirMode.AUTO)[0].from_cache
    cases = {
        "other bytes, same pixels": ([same_pixels_other_file(MIXED, "misses-2")], {}),
        "max_tiles": ([base], {"max_tiles": 2}),
        "vir off": ([base], {"vir": VirMode.OFF}),
        "vir max": ([base], {"vir": VirMode.MAX}),
        "threshold": ([base], {"threshold": 0.9}),
    }
    results = {}
    for name, (images, options) in cases.items():
        (results[name],) = encode(cached, images, **{"vir": VirMode.AUTO, **options})
        assert not results[name].from_cache, name
    # Identical pixels in another file: encoded again, to the same rows.
    assert torch.equal(results["other bytes, same pixels"].embeddings, first.embeddings)

    # Another checkpoint of the same width, sharing the very same cache object: a miss. (The
    # tiny Flash checkpoint is the plain one plus the router and mlp2, so with vir=off both
    # give the same rows: only the checkpoint digest in the key tells them apart.)
    plain = build(tiny_models["hf"], cache_mb=0)
    try:
        assert plain.checkpoint_digest != cached.checkpoint_digest
        plain.cache = cached.cache
        (off_here,) = encode(cached, [base], VirMode.OFF)
        (off_there,) = encode(plain, [base], VirMode.OFF)
        assert off_here.from_cache and not off_there.from_cache
        assert torch.equal(off_here.embeddings, off_there.embeddings)
    finally:
        plain.close()


def test_concurrent_requests_encode_once(cached, uncached):
    a, b, c = (encode_image(noise_image(640, 480, seed=s)) for s in (61, 62, 63))
    reference = {data: encode(uncached, [data], VirMode.OFF)[0] for data in (a, b, c)}
    tiles_of = {data: len(reference[data].tokens_per_tile) for data in (a, b, c)}
    calls = [[a], [a, b], [b, c], [c, a], [a], [b], [a, b, c], [c]] * 2

    async def scenario():  # type: ignore[no-untyped-def]
        return await asyncio.gather(
            *(
                collect(cached, EncodeCall([ImageInput(d) for d in images], (), OFF))
                for images in calls
            )
        )

    results, tiles = run(cached, scenario)
    # Each distinct image went through the ViT exactly once.
    assert tiles == sum(tiles_of.values())
    for images, encoded in zip(calls, results, strict=True):  # type: ignore[call-overload]
        for data, image in zip(images, encoded, strict=True):
            assert_identical([image], [reference[data]])
    assert sum(not e.from_cache for encoded in results for e in encoded) == 3  # type: ignore[union-attr]


def test_a_cancelled_leader_hands_over_to_a_waiting_request(cached):
    data = encode_image(noise_image(900, 600, seed=71))
    call = EncodeCall([ImageInput(data)], (), OFF)
    cache = cached.cache
    assert cache is not None

    passes_may_run = threading.Event()  # no pass ends before the leader is cancelled
    follower_waits = asyncio.Event()
    follower: asyncio.Task | None = None
    real_lookup = cache.lookup

    async def lookup(keys, rounds=4):  # type: ignore[no-untyped-def]
        # The follower finds the leader's claim: from here to waiting on it nothing awaits.
        if asyncio.current_task() is follower and any(key in cache._claims for key in keys):
            follower_waits.set()
        return await real_lookup(keys, rounds)

    async def scenario():  # type: ignore[no-untyped-def]
        nonlocal follower
        launch = cached.engine.batcher.run_pass

        def gated(slices):  # type: ignore[no-untyped-def]
            assert passes_may_run.wait(60), "the test never let the passes run"
            return launch(slices)

        cached.engine.batcher.run_pass = gated
        leader = asyncio.create_task(collect(cached, call))
        for _ in range(500):  # until the leader has claimed the image
            if cache._claims:
                break
            await asyncio.sleep(0.002)
        assert cache._claims
        follower = asyncio.create_task(collect(cached, call))
        await asyncio.wait_for(follower_waits.wait(), 60)  # the follower waits on the claim
        leader.cancel()
        passes_may_run.set()
        (encoded,) = await asyncio.wait_for(follower, 60)
        return leader.cancelled(), encoded

    cache.lookup = lookup  # type: ignore[method-assign]
    try:
        (leader_cancelled, encoded), _ = run(cached, scenario)
    finally:
        passes_may_run.set()
        del cache.lookup
    assert leader_cancelled
    assert not encoded.from_cache  # the follower encoded it itself
    assert encode(cached, [data], VirMode.OFF)[0].from_cache
    assert not cache._claims


def test_a_bad_image_releases_its_claims(cached):
    bad = b"\x89PNG\r\n\x1a\n not really"
    for _ in range(2):  # the second call must fail the same way, not wait forever
        with pytest.raises(InvalidImage):
            encode(cached, [bad])
    assert cached.cache is not None and not cached.cache._claims


def test_the_byte_bound_holds_under_a_stream_of_distinct_images(cached):
    rows_bytes = 5 * 256 * 128 * 4  # a 2x2 image + thumbnail, float32, 128 wide
    cache = EmbeddingCache(capacity_bytes=3 * rows_bytes)
    saved, cached.cache = cached.cache, cache
    try:
        images = [encode_image(noise_image(896, 896, seed=100 + i)) for i in range(10)]
        for index, data in enumerate(images):
            (encoded,) = encode(cached, [data], VirMode.OFF)
            assert encoded.embeddings.numel() * 4 == rows_bytes
            assert cache.num_bytes <= cache.capacity_bytes
            assert len(cache) == min(index + 1, 3)
        # Least recently used out: the last three are in, the first ones are not.
        assert encode(cached, [images[-1]], VirMode.OFF)[0].from_cache
        assert not encode(cached, [images[0]], VirMode.OFF)[0].from_cache
        # Rows larger than the whole bound are served but not kept.
        tiny = EmbeddingCache(capacity_bytes=rows_bytes - 1)
        cached.cache = tiny
        encode(cached, [images[1]], VirMode.OFF)
        assert len(tiny) == 0 and tiny.num_bytes == 0
    finally:
        cached.cache = saved


def test_cached_rows_do_not_hold_the_pass_they_came_from(cached):
    """Rows that are a view into a larger pass output are copied before they are kept, so
    the byte count is the memory really held."""
    images = [encode_image(noise_image(448, 448, seed=200 + i)) for i in range(3)]
    cache = EmbeddingCache(capacity_bytes=1 << 30)
    saved, cached.cache = cached.cache, cache
    try:
        encode(cached, images, VirMode.OFF)  # three one-tile images: one pass
        for entry in cache._entries.values():
            rows = entry.embeddings
            assert rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
        assert cache.num_bytes == 3 * 256 * 128 * 4
    finally:
        cached.cache = saved


def test_a_request_with_a_video_is_not_served_routed_rows_from_the_cache(cached, uncached):
    """Under vir=auto the video's frames are routed with the image, so the image's rows
    depend on the video: the rows cached for the image alone must not be served, and the
    request's own rows must not be cached for the image alone."""
    image = same_pixels_other_file(MIXED, "video-auto")
    (alone,) = encode(cached, [image], VirMode.AUTO)
    assert not alone.from_cache
    with_video = encode(cached, [image], VirMode.AUTO, videos=[VIDEO])
    reference = encode(uncached, [image], VirMode.AUTO, videos=[VIDEO])
    assert [e.is_video for e in with_video] == [False, True]
    assert not any(e.from_cache for e in with_video)
    assert_identical(with_video, reference)
    # The video changed the image's routing: a stale hit would have been visible.
    assert with_video[0].tokens_per_tile != alone.tokens_per_tile
    again = encode(cached, [image], VirMode.AUTO, videos=[VIDEO])
    assert not any(e.from_cache for e in again)
    assert_identical(again, reference)
    (alone_again,) = encode(cached, [image], VirMode.AUTO)
    assert alone_again.from_cache
    assert_identical([alone_again], [alone])


def test_images_next_to_a_video_hit_when_not_routed(cached, uncached):
    """Under vir=off an image's rows do not depend on the frames: the image hits, the video
    is encoded every time, and both equal a pipeline without a cache."""
    image = same_pixels_other_file(MIXED, "video-off")
    encode(cached, [image], VirMode.OFF)
    result, tiles = run(
        cached,
        lambda: collect(
            cached,
            EncodeCall(
                [ImageInput(image)],
                [VideoInput(VIDEO, num_frames=VIDEO_FRAMES)],
                OFF,
            ),
        ),
    )
    with_video: list[VisualEmbedding] = result  # type: ignore[assignment]
    assert [e.from_cache for e in with_video] == [True, False]
    assert tiles == VIDEO_FRAMES  # only the frames went through the ViT
    assert with_video[1].is_video
    assert with_video[1].tokens_per_tile == [256] * VIDEO_FRAMES
    assert_identical(with_video, encode(uncached, [image], VirMode.OFF, videos=[VIDEO]))

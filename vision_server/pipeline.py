"""One encode request, end to end, without any transport: validate, look up the embedding
cache, prepare, encode, route.

A request's items are its images, then its videos; a video is its sampled frames, one tile
each, encoded as one item. All tiles of the request, images and frames alike, go to the engine
in one call, so the router decides over all of them together, as the reference decides over
all pixel values of one call: a video's frames are never routed one by one.

Used by the gRPC servicer (DvD) and, in-process, by the language service's coupled mode, so
both run exactly the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any

from checkpoints.spec import CheckpointSpec
from protos.messages import (
    EncodeCall,
    Field,
    RowSelection,
    VideoFrames,
    VideoInput,
    VisualEmbedding,
    over_limit,
    too_many,
)
from protos.options import VirMode
from protos.tiling import TilingOptions, most_tiles
from vision_server import metrics, tracing
from vision_server.batching import BatchStats
from vision_server.embedding_cache import CachedImage, EmbeddingCache, Lookup, request_keys
from vision_server.engine import EncodedItem, EncoderEngine, TileParts
from vision_server.errors import InvalidImage, InvalidRequest, InvalidVideo, TooManyItems
from vision_server.media_workers import MediaWorkerConfig, MediaWorkerPool, default_workers
from vision_server.preprocess import ImageLimits, PreparedImage
from vision_server.routing import (
    TokenBudget,
    applied_mode,
    check_budget,
    resolve_mode,
    shaping_budget,
    thresholds,
)
from vision_server.settings import VisionSettings
from vision_server.video import PreparedVideo, VideoLimits

logger = logging.getLogger(__name__)


class VisionPipeline:
    """Validates and runs encode calls against one ``EncoderEngine``."""

    def __init__(
        self,
        engine: EncoderEngine,
        spec: CheckpointSpec,
        settings: VisionSettings,
        *,
        checkpoint_digest: str = "",
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.settings = settings
        self.checkpoint_digest = checkpoint_digest
        self.cache = cache
        self.limits = ImageLimits(
            max_image_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        self.video_limits = VideoLimits(
            max_bytes=settings.max_video_bytes,
            max_pixels=settings.max_video_pixels,
            max_duration_s=settings.max_video_duration_s,
            max_decoded_frames=settings.max_video_decoded_frames,
            max_decoded_pixels=settings.max_video_decoded_pixels,
            max_decode_s=settings.max_video_decode_s,
        )
        self.default_num_frames = settings.num_frames or spec.video_frames
        # Every image and video is decoded and tiled in these processes, never in this one.
        self.media = MediaWorkerPool(
            MediaWorkerConfig(
                workers=settings.preprocess_workers or default_workers(),
                memory_bytes=settings.media_worker_memory_mb * 1024 * 1024,
                item_cpu_s=settings.media_item_cpu_s,
                item_timeout_s=settings.media_item_timeout_s,
                image_limits=self.limits,
                video_limits=self.video_limits,
                max_image_tiles=most_tiles(settings.max_tiles_limit, use_thumbnail=True),
                max_frames=settings.max_num_frames,
                tile_size=spec.vision.image_size,
            )
        )
        overlap = settings.overlap_preparation
        self.overlap_preparation = overlap == "on" or (
            overlap == "auto" and engine.device.type == "cuda"
        )

    def close(self) -> None:
        self.media.close()

    # ---- validation -------------------------------------------------------------------------

    def _tiling_options(self, call: EncodeCall) -> TilingOptions:
        max_tiles = call.options.max_tiles or self.spec.max_tiles
        limit = self.settings.max_tiles_limit
        if max_tiles > limit:
            message = over_limit("max_tiles", max_tiles, limit, "tiles per image")
            raise InvalidRequest(message, field=Field.MAX_TILES)
        if max_tiles < self.spec.min_tiles:
            raise InvalidRequest(
                f"max_tiles must be at least {self.spec.min_tiles}", field=Field.MAX_TILES
            )
        threshold = call.options.vir_threshold
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidRequest(
                f"vir_threshold must be in [0, 1], got {threshold}", field=Field.VIR_THRESHOLD
            )
        return TilingOptions(
            min_tiles=self.spec.min_tiles,
            max_tiles=max_tiles,
            use_thumbnail=self.spec.use_thumbnail,
            tile_size=self.spec.vision.image_size,
        )

    def _image_options(self, options: TilingOptions, max_tiles: int | None) -> TilingOptions:
        if not max_tiles or max_tiles == options.max_tiles:
            return options
        if not self.spec.min_tiles <= max_tiles <= self.settings.max_tiles_limit:
            raise InvalidImage(
                f"image max_tiles={max_tiles} is outside [{self.spec.min_tiles}, "
                f"{self.settings.max_tiles_limit}]",
                field=Field.IMAGE_MAX_TILES,
            )
        return dataclasses.replace(options, max_tiles=max_tiles)

    def image_tiling(self, call: EncodeCall) -> list[TilingOptions]:
        """How each image of ``call`` is tiled, validated as ``encode`` validates it (the
        threshold calibration cuts images with exactly these)."""
        options = self._tiling_options(call)
        return [self._image_options(options, image.max_tiles) for image in call.images]

    def _num_frames(self, video: VideoInput) -> int:
        num_frames = video.num_frames or self.default_num_frames
        limit = self.settings.max_num_frames
        if num_frames > limit:
            message = over_limit("num_frames", num_frames, limit, "frames per video")
            raise InvalidRequest(message, field=Field.NUM_FRAMES)
        return num_frames

    def _check_counts(self, call: EncodeCall) -> list[int]:
        """Refuses too many items, before decoding anything; the frames of each video."""
        if not call.images and not call.videos:
            raise InvalidRequest("request has no images or videos")
        settings = self.settings
        if len(call.images) > settings.max_images_per_request:
            message = too_many("images", len(call.images), settings.max_images_per_request)
            raise TooManyItems(message, field=Field.IMAGES)
        if len(call.videos) > settings.max_videos_per_request:
            message = too_many("videos", len(call.videos), settings.max_videos_per_request)
            raise TooManyItems(message, field=Field.VIDEOS)
        frames = [self._num_frames(video) for video in call.videos]
        if sum(frames) > settings.max_tiles_per_request:  # known before decoding anything
            raise TooManyItems(
                f"the videos of this request make {sum(frames)} frames; the limit is "
                f"{settings.max_tiles_per_request} tiles (lower num_frames)",
                field=Field.VIDEOS,
            )
        return frames

    def _admit(self, to_encode: Sequence[TilingOptions], frames: Sequence[int]) -> None:
        """Refuse a call with ``Overloaded`` before any of its images or videos is decoded
        when the tile queue lacks room for the most tiles it can make: each image still to
        encode (cache hits need no room) at its ``max_tiles`` plus a thumbnail, and one tile
        per video frame; all known before decoding. The bound is capped by the per-request
        tile limit and by the queue's own size, so an idle service still admits any call and
        the exact check at submit time decides, as it always does."""
        most = sum(options.most_tiles for options in to_encode)
        most = min(most + sum(frames), self.settings.max_tiles_per_request)
        if most == 0:
            return
        tile_size = self.spec.vision.image_size
        tile_bytes = 3 * tile_size**2  # RGB, uint8
        batcher = self.engine.batcher
        batcher.check_room(
            min(most, batcher.max_queued_tiles), min(most * tile_bytes, batcher.max_queued_bytes)
        )

    async def _prepare(
        self,
        call: EncodeCall,
        per_image: list[TilingOptions],
        indexes: list[int],
        frames: list[int],
    ) -> tuple[dict[int, PreparedImage | TileParts], list[PreparedVideo]]:
        """Decode and tile the images at ``indexes`` and sample every video, in the media
        workers. While the encoder is idle, an image comes back as soon as it is decoded and
        its grid and thumbnail are cut on two threads of its worker, the engine taking each
        part as soon as it is cut (``TileParts``); under load, each image comes in one piece,
        one pass slice. The first item that fails fails the call, and the others are stopped
        (their workers are told, or killed)."""
        in_parts = self.overlap_preparation and self.engine.idle
        media = self.media
        image_jobs = [
            asyncio.ensure_future(
                tracing.traced(
                    media.prepare_image(call.images[index].data, per_image[index], in_parts),
                    "vision.preprocess",
                    {"dvd.item": f"image {index}"},
                )
            )
            for index in indexes
        ]
        video_jobs = [
            asyncio.ensure_future(
                tracing.traced(
                    media.prepare_video(video.data, count),
                    "vision.preprocess",
                    {"dvd.item": f"video {index}", "dvd.frames": count},
                )
            )
            for index, (video, count) in enumerate(zip(call.videos, frames, strict=True))
        ]
        jobs: list[asyncio.Future[Any]] = [*image_jobs, *video_jobs]
        # What each job is, for its error: "image 3", "video 0".
        labels = [f"image {index}" for index in indexes]
        labels += [f"video {index}" for index in range(len(video_jobs))]
        succeeded = False
        try:
            pending = set(jobs)
            while pending:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for job, label in zip(jobs, labels, strict=True):
                    if job.done() and (error := job.exception()) is not None:
                        raise _labelled(error, label)
            succeeded = True
        finally:
            if not succeeded:  # stop what still runs, drop the parts still being cut
                for job in jobs:
                    if not job.done():
                        job.cancel()
                    elif not job.cancelled() and job.exception() is None:  # (retrieved)
                        _discard_parts([job.result()])
        images = [job.result() for job in image_jobs]
        videos = [job.result() for job in video_jobs]
        return dict(zip(indexes, images, strict=True)), videos

    def _check_tiles(
        self,
        prepared: dict[int, PreparedImage | TileParts],
        hits: dict[int, CachedImage],
        videos: list[PreparedVideo],
        count: int,
    ) -> None:
        tiles = sum(
            prepared[index].num_tiles if index in prepared else len(hits[index].tokens_per_tile)
            for index in range(count)
        )
        tiles += sum(video.num_frames for video in videos)
        if tiles > self.settings.max_tiles_per_request:
            raise TooManyItems(
                f"the images and video frames of this request make {tiles} tiles; the limit is "
                f"{self.settings.max_tiles_per_request} (lower max_tiles or num_frames, or send "
                "fewer images or videos)",
                field=Field.IMAGES,
            )

    async def _lookup(
        self,
        call: EncodeCall,
        per_image: list[TilingOptions],
        applied: VirMode | None,
        budget: TokenBudget | None,
    ) -> Lookup | None:
        """The request's hits and claims in the embedding cache (None when it is off, or
        does not apply to this request). ``budget``: the one that shapes its rows."""
        if self.cache is None or not call.images:
            return None
        routed = RowSelection.for_mode(applied, budget is not None) is RowSelection.ROUTED
        if call.videos and routed:
            # Routed rows depend on every tile of the request, frames included, and videos
            # are not cached: such a request could never hit, and its rows must not be served
            # to a request without the same videos.
            return None
        # sha256 releases the GIL: large images are hashed off the event loop, in parallel.
        hashes = await asyncio.gather(
            *(asyncio.to_thread(hashlib.sha256, image.data) for image in call.images)
        )
        flash = self.spec.flash
        router = thresholds(flash, call.options.vir_threshold) if flash is not None else None
        keys = request_keys(
            [digest.digest() for digest in hashes],
            per_image,
            applied,
            router,
            self.checkpoint_digest,
            self.engine.dtype,
            budget,
        )
        return await self.cache.lookup(keys)

    def _check_budget(
        self,
        budget: TokenBudget,
        applied: VirMode | None,
        prepared: dict[int, PreparedImage | TileParts],
        hits: dict[int, CachedImage],
        videos: list[PreparedVideo],
    ) -> None:
        """Refuse a visual-token budget no routing can meet, once every item's tiles are
        known and before any is encoded (``max`` ignores the budget)."""
        if not budget.is_set or applied is VirMode.MAX:
            return
        images = range(len(budget.per_item) - len(videos))
        tiles = [
            prepared[index].num_tiles if index in prepared else len(hits[index].tokens_per_tile)
            for index in images
        ]
        tiles += [video.num_frames for video in videos]
        labels = [f"image {index}" for index in images]  # only images have caps of their own
        compressed = self.spec.compressed_tokens_per_tile if applied is not None else None
        check_budget(budget, tiles, self.spec.tokens_per_tile, compressed, labels)

    # ---- encoding ---------------------------------------------------------------------------

    async def encode(self, call: EncodeCall) -> AsyncGenerator[VisualEmbedding, None]:
        """The call's items in order, its images then its videos (``frames`` set); raises
        ``VisionError`` types for bad requests."""
        if self.engine.failure is not None:  # fail fast, before decoding anything
            raise self.engine.failure
        options = self._tiling_options(call)
        vir_mode = resolve_mode(call.options.vir, self.engine.has_router)
        frames = self._check_counts(call)
        per_image = [self._image_options(options, image.max_tiles) for image in call.images]
        applied = applied_mode(vir_mode, self.engine.has_router)
        count = len(call.images)
        # Each item's own cap (images only), then the request's over all of them.
        budget = TokenBudget(
            call.options.max_visual_tokens,
            (*(image.max_visual_tokens for image in call.images), *(None for _ in frames)),
        )
        shaping = shaping_budget(budget, applied)
        routed = RowSelection.for_mode(applied, shaping is not None) is RowSelection.ROUTED
        lookup = await self._lookup(call, per_image, applied, shaping)
        prepared: dict[int, PreparedImage | TileParts] = {}
        try:
            hits = lookup.hits if lookup is not None else {}
            if len(hits) == count:
                todo: list[int] = []
            elif routed:
                # Routing is per request: one image to encode means encoding all of them.
                todo = list(range(count))
            else:
                todo = [index for index in range(count) if index not in hits]
            self._admit([per_image[index] for index in todo], frames)
            prepared, videos = await self._prepare(call, per_image, todo, frames)
            self._check_tiles(prepared, hits, videos, count)
            self._check_budget(budget, applied, prepared, hits, videos)
            # The prepared images and the videos' frames go through the engine in one call,
            # so the router sees all of them; the other images come from the cache.
            to_encode = [*(prepared[index] for index in sorted(prepared))]
            to_encode += [video.frames for video in videos]
            stream = (
                self.engine.encode_request(
                    to_encode, call.request_id, vir_mode, call.options.vir_threshold, shaping
                )
                if to_encode
                else _nothing()
            )
            async with contextlib.aclosing(stream) as encoded_items:
                for index in range(count):
                    if index not in prepared:
                        metrics.embedding_cache_hits.inc()
                        yield self._item(self._from_cache(hits[index]))
                        continue
                    encoded = await anext(encoded_items)
                    if lookup is not None:
                        metrics.embedding_cache_misses.inc()
                        lookup.store(index, _cached(encoded))
                    yield self._item(encoded)
                for video_index, video in enumerate(videos):
                    encoded = await anext(encoded_items)
                    metrics.videos.inc()
                    metrics.video_frames.inc(video.num_frames)
                    info = video.info
                    yield self._item(
                        encoded,
                        VideoFrames(
                            video_index,
                            video.frame_numbers,
                            info.total_frames,
                            info.duration_s,
                            info.fps,
                        ),
                    )
        finally:
            if lookup is not None:
                lookup.release()
            _discard_parts(prepared.values())

    def _item(self, encoded: EncodedItem, frames: VideoFrames | None = None) -> VisualEmbedding:
        """The contract's form of an encoded image or video (``frames``), with its metrics."""
        if frames is None:
            metrics.images.inc()
        metrics.queue_wait.observe(encoded.stats.queue_ms / 1000)
        stats = encoded.stats
        tracing.item_spans(stats.enqueued_at, stats.first_pass_at, stats.passes, None)
        metrics.visual_tokens.inc(encoded.num_visual_tokens)
        return VisualEmbedding(
            embeddings=encoded.embeddings,
            tokens_per_tile=encoded.tokens_per_tile,
            full_tokens_per_tile=self.spec.tokens_per_tile,
            vir=encoded.vir_mode,
            from_cache=encoded.from_cache,
            frames=frames,
            grid=encoded.grid,
            queue_ms=encoded.stats.queue_ms,
            encode_ms=encoded.stats.encode_ms,
        )

    def _from_cache(self, cached: CachedImage) -> EncodedItem:
        spec = self.spec
        metrics.observe_routing(
            cached.tokens_per_tile, spec.tokens_per_tile, spec.compressed_tokens_per_tile
        )
        return EncodedItem(
            embeddings=cached.embeddings,
            tokens_per_tile=list(cached.tokens_per_tile),
            grid=cached.grid,
            stats=BatchStats(queue_ms=0.0, encode_ms=0.0),
            vir_mode=cached.vir_mode,
            from_cache=True,
        )


async def _nothing() -> AsyncGenerator[EncodedItem, None]:
    """The engine's stream when every image is a cache hit and there is no video."""
    return
    yield


def _labelled(error: BaseException, label: str) -> BaseException:
    """``error`` of a bad image or video, saying which one of the request it is (``label``:
    "image 3", "video 0")."""
    if isinstance(error, InvalidImage | InvalidVideo):
        return type(error)(f"{label}: {error}", field=error.field)
    return error


def _discard_parts(images: Iterable[PreparedImage | TileParts | PreparedVideo]) -> None:
    """Cancel the cuts nobody will await (the call failed or ended early); retrieve the errors
    of those that failed, so none is logged as never retrieved."""
    for image in images:
        if not isinstance(image, TileParts):
            continue
        for part in image.parts:
            if not isinstance(part, asyncio.Future):
                continue
            if not part.done():
                part.cancel()
            elif not part.cancelled():
                part.exception()


def _cached(encoded: EncodedItem) -> CachedImage:
    return CachedImage(
        embeddings=encoded.embeddings,
        tokens_per_tile=tuple(encoded.tokens_per_tile),
        grid=encoded.grid,
        vir_mode=encoded.vir_mode,
    )

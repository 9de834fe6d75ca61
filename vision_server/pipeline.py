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
from dataclasses import dataclass
from typing import cast

from checkpoints.spec import CheckpointSpec
from protos.options import VirMode
from vision_server import metrics
from vision_server.batching import BatchStats
from vision_server.embedding_cache import (
    CachedImage,
    EmbeddingCache,
    Lookup,
    request_keys,
    tiling_of,
)
from vision_server.engine import EncodedImage, EncoderEngine, TileParts
from vision_server.errors import InvalidImage, InvalidRequest, InvalidVideo, TooManyImages
from vision_server.media_workers import MediaWorkerConfig, MediaWorkerPool, default_workers
from vision_server.preprocess import ImageLimits, PreparedImage, TilingOptions
from vision_server.settings import VisionSettings
from vision_server.video import PreparedVideo, SampledFrames, VideoLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePayload:
    data: bytes  # the encoded file
    max_tiles: int = 0  # 0: the request's


@dataclass(frozen=True)
class VideoPayload:
    data: bytes  # the encoded file
    num_frames: int = 0  # 0: the service's default


@dataclass(frozen=True)
class EncodeCall:
    images: Sequence[ImagePayload]
    videos: Sequence[VideoPayload] = ()
    max_tiles: int = 0  # 0: the checkpoint's
    vir_mode: VirMode | None = None  # None: the default (auto)
    vir_threshold: float | None = None
    request_id: str = ""


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
                max_image_tiles=settings.max_tiles_limit + 1,
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

    def _vir_mode(self, requested: VirMode | None) -> VirMode:
        """The router mode to apply; refuses what the checkpoint cannot do."""
        if requested is VirMode.MAX and not self.engine.has_router:
            raise InvalidRequest(
                "vir='max' needs a Visual Resolution Router, and this checkpoint has none "
                "(not an InternVL3.5-Flash checkpoint); use 'auto' or 'off'"
            )
        return requested or VirMode.AUTO

    def _tiling_options(self, call: EncodeCall) -> TilingOptions:
        max_tiles = call.max_tiles or self.spec.max_tiles
        if max_tiles > self.settings.max_tiles_limit:
            raise InvalidRequest(
                f"max_tiles={max_tiles} exceeds this service's limit of "
                f"{self.settings.max_tiles_limit}"
            )
        if max_tiles < self.spec.min_tiles:
            raise InvalidRequest(f"max_tiles must be at least {self.spec.min_tiles}")
        if call.vir_threshold is not None and not 0.0 <= call.vir_threshold <= 1.0:
            raise InvalidRequest(f"vir_threshold must be in [0, 1], got {call.vir_threshold}")
        return TilingOptions(
            min_tiles=self.spec.min_tiles,
            max_tiles=max_tiles,
            use_thumbnail=self.spec.use_thumbnail,
            tile_size=self.spec.vision.image_size,
        )

    def _image_options(self, options: TilingOptions, max_tiles: int) -> TilingOptions:
        if not max_tiles or max_tiles == options.max_tiles:
            return options
        if not self.spec.min_tiles <= max_tiles <= self.settings.max_tiles_limit:
            raise InvalidRequest(
                f"image max_tiles={max_tiles} is outside [{self.spec.min_tiles}, "
                f"{self.settings.max_tiles_limit}]"
            )
        return dataclasses.replace(options, max_tiles=max_tiles)

    def _num_frames(self, video: VideoPayload) -> int:
        num_frames = video.num_frames or self.default_num_frames
        if num_frames > self.settings.max_num_frames:
            raise InvalidRequest(
                f"num_frames={num_frames} exceeds this service's limit of "
                f"{self.settings.max_num_frames} frames per video"
            )
        return num_frames

    def _check_counts(self, call: EncodeCall) -> list[int]:
        """Refuses too many items, before decoding anything; the frames of each video."""
        if not call.images and not call.videos:
            raise InvalidRequest("request has no images or videos")
        if len(call.images) > self.settings.max_images_per_request:
            raise TooManyImages(
                f"{len(call.images)} images in one request; the limit is "
                f"{self.settings.max_images_per_request}"
            )
        if len(call.videos) > self.settings.max_videos_per_request:
            raise TooManyImages(
                f"{len(call.videos)} videos in one request; the limit is "
                f"{self.settings.max_videos_per_request}"
            )
        frames = [self._num_frames(video) for video in call.videos]
        if sum(frames) > self.settings.max_tiles_per_request:  # known before decoding anything
            raise TooManyImages(
                f"the videos of this request make {sum(frames)} frames; the limit is "
                f"{self.settings.max_tiles_per_request} tiles (lower num_frames)"
            )
        return frames

    def _admit(self, to_encode: Sequence[TilingOptions], frames: Sequence[int]) -> None:
        """Refuse a call with ``Overloaded`` before any of its images or videos is decoded
        when the tile queue lacks room for the most tiles it can make: each image still to
        encode (cache hits need no room) at its ``max_tiles`` plus a thumbnail, and one tile
        per video frame; all known before decoding. The bound is capped by the per-request
        tile limit and by the queue's own size, so an idle service still admits any call and
        the exact check at submit time decides, as it always does."""
        most = sum(o.max_tiles + int(o.use_thumbnail and o.max_tiles > 1) for o in to_encode)
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
        jobs: list[asyncio.Future[PreparedImage | TileParts | PreparedVideo]] = [
            asyncio.ensure_future(
                media.prepare_image(call.images[index].data, per_image[index], in_parts)
            )
            for index in indexes
        ]
        jobs += [
            asyncio.ensure_future(media.prepare_video(video.data, count))
            for video, count in zip(call.videos, frames, strict=True)
        ]
        succeeded = False
        try:
            pending = set(jobs)
            while pending:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for position, job in enumerate(jobs):
                    if job.done() and (error := job.exception()) is not None:
                        raise _labelled(error, position, indexes)
            succeeded = True
        finally:
            if not succeeded:  # stop what still runs, drop the parts still being cut
                for job in jobs:
                    if not job.done():
                        job.cancel()
                    elif not job.cancelled() and job.exception() is None:  # (retrieved)
                        _discard_parts([job.result()])
        results = [job.result() for job in jobs]
        images = cast(list[PreparedImage | TileParts], results[: len(indexes)])
        videos = cast(list[PreparedVideo], results[len(indexes) :])
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
            raise TooManyImages(
                f"the images and video frames of this request make {tiles} tiles; the limit is "
                f"{self.settings.max_tiles_per_request} (lower max_tiles or num_frames, or send "
                "fewer images or videos)"
            )

    async def _lookup(
        self, call: EncodeCall, per_image: list[TilingOptions], applied: VirMode | None
    ) -> Lookup | None:
        """The request's hits and claims in the embedding cache (None when it is off, or
        does not apply to this request)."""
        if self.cache is None or not call.images:
            return None
        if call.videos and applied is VirMode.AUTO:
            # Routed rows depend on every tile of the request, frames included, and videos
            # are not cached: such a request could never hit, and its rows must not be served
            # to a request without the same videos.
            return None
        # sha256 releases the GIL: large images are hashed off the event loop, in parallel.
        hashes = await asyncio.gather(
            *(asyncio.to_thread(hashlib.sha256, image.data) for image in call.images)
        )
        flash = self.spec.flash
        thresholds = None
        if flash is not None:
            absolute = call.vir_threshold
            if absolute is None:
                absolute = flash.absolute_threshold
            thresholds = (flash.relative_threshold, absolute)
        keys = request_keys(
            [digest.digest() for digest in hashes],
            [tiling_of(options) for options in per_image],
            applied,
            thresholds,
            self.checkpoint_digest,
            self.engine.dtype,
        )
        return await self.cache.lookup(keys)

    # ---- encoding ---------------------------------------------------------------------------

    async def encode(self, call: EncodeCall) -> AsyncGenerator[EncodedImage, None]:
        """Encoded items in request order, the images then the videos (``video`` set);
        raises ``VisionError`` types for bad requests."""
        if self.engine.failure is not None:  # fail fast, before decoding anything
            raise self.engine.failure
        options = self._tiling_options(call)
        vir_mode = self._vir_mode(call.vir_mode)
        frames = self._check_counts(call)
        per_image = [self._image_options(options, image.max_tiles) for image in call.images]
        applied = vir_mode if self.engine.has_router else None
        count = len(call.images)
        lookup = await self._lookup(call, per_image, applied)
        prepared: dict[int, PreparedImage | TileParts] = {}
        try:
            hits = lookup.hits if lookup is not None else {}
            if len(hits) == count:
                todo: list[int] = []
            elif applied is VirMode.AUTO:
                # Routing is per request: one image to encode means encoding all of them.
                todo = list(range(count))
            else:
                todo = [index for index in range(count) if index not in hits]
            self._admit([per_image[index] for index in todo], frames)
            prepared, videos = await self._prepare(call, per_image, todo, frames)
            self._check_tiles(prepared, hits, videos, count)
            stream = self._encode_in_order(call, vir_mode, prepared, hits, videos)
            async for index, encoded in stream:
                if index < count:
                    if lookup is not None:
                        if encoded.from_cache:
                            metrics.embedding_cache_hits.inc()
                        else:
                            metrics.embedding_cache_misses.inc()
                            lookup.store(index, _cached(encoded))
                    metrics.images.inc()
                else:
                    metrics.videos.inc()
                    metrics.video_frames.inc(videos[index - count].num_frames)
                metrics.queue_wait.observe(encoded.stats.queue_ms / 1000)
                metrics.visual_tokens.inc(encoded.num_visual_tokens)
                yield encoded
        finally:
            if lookup is not None:
                lookup.release()
            _discard_parts(prepared.values())

    async def _encode_in_order(
        self,
        call: EncodeCall,
        vir_mode: VirMode,
        prepared: dict[int, PreparedImage | TileParts],
        hits: dict[int, CachedImage],
        videos: list[PreparedVideo],
    ) -> AsyncGenerator[tuple[int, EncodedImage], None]:
        """(index, item) in request order: the prepared images and the videos' frames through
        the engine (one call, so the router sees all of them), the other images from the
        cache; a video's index counts after the images."""
        count = len(call.images)
        if not prepared and not videos:  # every image is a hit
            for index in range(count):
                yield index, self._from_cache(hits[index])
            return
        todo = sorted(prepared)
        items = [*(prepared[index] for index in todo), *(video.frames for video in videos)]
        stream = self.engine.encode_request(items, call.request_id, vir_mode, call.vir_threshold)
        async with contextlib.aclosing(stream) as encoded_items:
            engine_items = aiter(encoded_items)
            for index in range(count):
                if index in prepared:
                    yield index, await anext(engine_items)
                else:
                    yield index, self._from_cache(hits[index])
            for video_index, video in enumerate(videos):
                encoded = await anext(engine_items)
                sampled = SampledFrames(video_index, video.frame_numbers, video.info)
                yield count + video_index, dataclasses.replace(encoded, video=sampled)

    def _from_cache(self, cached: CachedImage) -> EncodedImage:
        full, small = self.spec.tokens_per_tile, self.spec.compressed_tokens_per_tile
        compressed = sum(1 for tokens in cached.tokens_per_tile if tokens < full)
        metrics.observe_routing(
            kept=len(cached.tokens_per_tile) - compressed,
            compressed=compressed,
            full_tokens=full,
            compressed_tokens=small,
        )
        return EncodedImage(
            embeddings=cached.embeddings,
            tokens_per_tile=list(cached.tokens_per_tile),
            grid=cached.grid,
            stats=BatchStats(queue_ms=0.0, encode_ms=0.0),
            vir_mode=cached.vir_mode,
            from_cache=True,
        )


def _labelled(error: BaseException, position: int, indexes: list[int]) -> BaseException:
    """``error`` of the job at ``position`` (the images to encode, then the videos), saying
    which image or video of the request it is about."""
    if isinstance(error, InvalidImage):
        return InvalidImage(f"image {indexes[position]}: {error}")
    if isinstance(error, InvalidVideo):
        return InvalidVideo(f"video {position - len(indexes)}: {error}")
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


def _cached(encoded: EncodedImage) -> CachedImage:
    return CachedImage(
        embeddings=encoded.embeddings,
        tokens_per_tile=tuple(encoded.tokens_per_tile),
        grid=encoded.grid,
        vir_mode=encoded.vir_mode,
    )

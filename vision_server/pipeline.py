"""One encode request, end to end, without any transport: validate, prepare, encode, route.

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
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import cast

from checkpoints.spec import CheckpointSpec
from protos.options import VirMode
from vision_server import metrics
from vision_server.engine import EncodedImage, EncoderEngine
from vision_server.errors import InvalidImage, InvalidRequest, InvalidVideo, TooManyImages
from vision_server.preprocess import ImageLimits, PreparedImage, TilingOptions, prepare_image
from vision_server.settings import VisionSettings
from vision_server.threads import started_pool
from vision_server.video import PreparedVideo, SampledFrames, VideoLimits, prepare_video

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
        self, engine: EncoderEngine, spec: CheckpointSpec, settings: VisionSettings
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.settings = settings
        self.limits = ImageLimits(
            max_image_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        self.video_limits = VideoLimits(
            max_bytes=settings.max_video_bytes,
            max_pixels=settings.max_video_pixels,
            max_duration_s=settings.max_video_duration_s,
            max_decoded_frames=settings.max_video_decoded_frames,
        )
        self.default_num_frames = settings.num_frames or spec.video_frames
        self._preprocess_pool = started_pool(settings.preprocess_workers, "preprocess")

    def close(self) -> None:
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)

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

    def _check_counts(self, call: EncodeCall) -> None:
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

    async def _prepare(
        self, call: EncodeCall, options: TilingOptions
    ) -> tuple[list[PreparedImage], list[PreparedVideo]]:
        self._check_counts(call)
        per_image = [self._image_options(options, image.max_tiles) for image in call.images]
        frames = [self._num_frames(video) for video in call.videos]
        if sum(frames) > self.settings.max_tiles_per_request:  # known before decoding anything
            raise TooManyImages(
                f"the videos of this request make {sum(frames)} frames; the limit is "
                f"{self.settings.max_tiles_per_request} tiles (lower num_frames)"
            )
        loop = asyncio.get_running_loop()
        pool = self._preprocess_pool
        image_jobs = [
            loop.run_in_executor(pool, prepare_image, image.data, self.limits, opts)
            for image, opts in zip(call.images, per_image, strict=True)
        ]
        tile_size = self.spec.vision.image_size
        video_jobs = [
            loop.run_in_executor(
                pool, prepare_video, video.data, count, self.video_limits, tile_size
            )
            for video, count in zip(call.videos, frames, strict=True)
        ]
        results = await asyncio.gather(*image_jobs, *video_jobs, return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, InvalidImage):
                raise InvalidImage(f"image {index}: {result}")
            if isinstance(result, InvalidVideo):
                raise InvalidVideo(f"video {index - len(image_jobs)}: {result}")
            if isinstance(result, BaseException):
                raise result
        images = cast(list[PreparedImage], results[: len(image_jobs)])
        videos = cast(list[PreparedVideo], results[len(image_jobs) :])
        tiles = sum(int(image.tiles.shape[0]) for image in images)
        tiles += sum(video.num_frames for video in videos)
        if tiles > self.settings.max_tiles_per_request:
            raise TooManyImages(
                f"the images and video frames of this request make {tiles} tiles; the limit is "
                f"{self.settings.max_tiles_per_request} (lower max_tiles or num_frames, or send "
                "fewer images or videos)"
            )
        return images, videos

    # ---- encoding ---------------------------------------------------------------------------

    async def encode(self, call: EncodeCall) -> AsyncGenerator[EncodedImage, None]:
        """Encoded items in request order, the images then the videos (``video`` set);
        raises ``VisionError`` types for bad requests."""
        if self.engine.failure is not None:  # fail fast, before decoding anything
            raise self.engine.failure
        options = self._tiling_options(call)
        vir_mode = self._vir_mode(call.vir_mode)
        images, videos = await self._prepare(call, options)
        items = [*images, *(video.frames for video in videos)]
        stream = self.engine.encode_request(items, call.request_id, vir_mode, call.vir_threshold)
        async with contextlib.aclosing(stream) as encoded_items:
            index = 0
            async for encoded in encoded_items:
                metrics.queue_wait.observe(encoded.stats.queue_ms / 1000)
                metrics.visual_tokens.inc(encoded.num_visual_tokens)
                if index < len(images):
                    metrics.images.inc()
                    yield encoded
                else:
                    video_index = index - len(images)
                    video = videos[video_index]
                    metrics.videos.inc()
                    metrics.video_frames.inc(video.num_frames)
                    sampled = SampledFrames(video_index, video.frame_numbers, video.info)
                    yield dataclasses.replace(encoded, video=sampled)
                index += 1

"""One encode request, end to end, without any transport: validate, prepare, encode, route.

Used by the gRPC servicer (DvD) and, in-process, by the language service's coupled mode, so
both run exactly the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from checkpoints.spec import CheckpointSpec
from protos.options import VirMode
from vision_server import metrics
from vision_server.engine import EncodedImage, EncoderEngine
from vision_server.errors import InvalidImage, InvalidRequest, TooManyImages
from vision_server.preprocess import ImageLimits, PreparedImage, TilingOptions, prepare_image
from vision_server.settings import VisionSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePayload:
    data: bytes  # the encoded file
    max_tiles: int = 0  # 0: the request's


@dataclass(frozen=True)
class EncodeCall:
    images: Sequence[ImagePayload]
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
        self._preprocess_pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_workers, thread_name_prefix="preprocess"
        )

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

    def _admit(self, per_image: Sequence[TilingOptions]) -> None:
        """Refuse a call with ``Overloaded`` before any of its images is decoded when the tile
        queue lacks room for the most tiles it can make: each image's ``max_tiles`` plus a
        thumbnail (known before decoding), capped by the per-request tile limit. The bound
        is capped by the queue's own size too, so that an idle service still admits any call
        and the exact per-image check at submit time decides, as it always does."""
        most = sum(o.max_tiles + int(o.use_thumbnail and o.max_tiles > 1) for o in per_image)
        most = min(most, self.settings.max_tiles_per_request)
        tile_bytes = 3 * per_image[0].tile_size ** 2  # RGB, uint8
        batcher = self.engine.batcher
        batcher.check_room(
            min(most, batcher.max_queued_tiles), min(most * tile_bytes, batcher.max_queued_bytes)
        )

    async def _prepare(self, call: EncodeCall, options: TilingOptions) -> list[PreparedImage]:
        if not call.images:
            raise InvalidRequest("request has no images")
        if len(call.images) > self.settings.max_images_per_request:
            raise TooManyImages(
                f"{len(call.images)} images in one request; the limit is "
                f"{self.settings.max_images_per_request}"
            )
        per_image = [self._image_options(options, image.max_tiles) for image in call.images]
        self._admit(per_image)
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(
                self._preprocess_pool, prepare_image, image.data, self.limits, opts
            )
            for image, opts in zip(call.images, per_image, strict=True)
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        prepared: list[PreparedImage] = []
        for index, result in enumerate(results):
            if isinstance(result, InvalidImage):
                raise InvalidImage(f"image {index}: {result}")
            if isinstance(result, BaseException):
                raise result
            prepared.append(result)
        tiles = sum(image.grid.num_tiles for image in prepared)
        if tiles > self.settings.max_tiles_per_request:
            raise TooManyImages(
                f"the images of this request make {tiles} tiles; the limit is "
                f"{self.settings.max_tiles_per_request} (lower max_tiles or send fewer images)"
            )
        return prepared

    # ---- encoding ---------------------------------------------------------------------------

    async def encode(self, call: EncodeCall) -> AsyncGenerator[EncodedImage, None]:
        """Encoded images in request order; raises ``VisionError`` types for bad requests."""
        if self.engine.failure is not None:  # fail fast, before decoding anything
            raise self.engine.failure
        options = self._tiling_options(call)
        vir_mode = self._vir_mode(call.vir_mode)
        images = await self._prepare(call, options)
        stream = self.engine.encode_request(images, call.request_id, vir_mode, call.vir_threshold)
        async with contextlib.aclosing(stream) as encoded_images:
            async for encoded in encoded_images:
                metrics.queue_wait.observe(encoded.stats.queue_ms / 1000)
                metrics.images.inc()
                metrics.visual_tokens.inc(encoded.num_visual_tokens)
                yield encoded

"""One encode request, end to end, without any transport: validate, look up the embedding
cache, prepare, encode, route.

Used by the gRPC servicer (DvD) and, in-process, by the language service's coupled mode, so
both run exactly the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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

    def _check_image_count(self, call: EncodeCall) -> None:
        if not call.images:
            raise InvalidRequest("request has no images")
        if len(call.images) > self.settings.max_images_per_request:
            raise TooManyImages(
                f"{len(call.images)} images in one request; the limit is "
                f"{self.settings.max_images_per_request}"
            )

    async def _prepare(
        self, call: EncodeCall, per_image: list[TilingOptions], indexes: list[int]
    ) -> dict[int, PreparedImage]:
        """Decode and tile the images at ``indexes`` (in the thread pool)."""
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(
                self._preprocess_pool,
                prepare_image,
                call.images[index].data,
                self.limits,
                per_image[index],
            )
            for index in indexes
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        prepared: dict[int, PreparedImage] = {}
        for index, result in zip(indexes, results, strict=True):
            if isinstance(result, InvalidImage):
                raise InvalidImage(f"image {index}: {result}")
            if isinstance(result, BaseException):
                raise result
            prepared[index] = result
        return prepared

    def _check_tiles(
        self, prepared: dict[int, PreparedImage], hits: dict[int, CachedImage], count: int
    ) -> None:
        tiles = sum(
            prepared[index].grid.num_tiles
            if index in prepared
            else len(hits[index].tokens_per_tile)
            for index in range(count)
        )
        if tiles > self.settings.max_tiles_per_request:
            raise TooManyImages(
                f"the images of this request make {tiles} tiles; the limit is "
                f"{self.settings.max_tiles_per_request} (lower max_tiles or send fewer images)"
            )

    async def _lookup(
        self, call: EncodeCall, per_image: list[TilingOptions], applied: VirMode | None
    ) -> Lookup | None:
        """The request's hits and claims in the embedding cache (None when it is off)."""
        if self.cache is None:
            return None
        loop = asyncio.get_running_loop()
        # sha256 releases the GIL: large images are hashed off the event loop, in parallel.
        hashes = await asyncio.gather(
            *(
                loop.run_in_executor(self._preprocess_pool, hashlib.sha256, image.data)
                for image in call.images
            )
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
        """Encoded images in request order; raises ``VisionError`` types for bad requests."""
        if self.engine.failure is not None:  # fail fast, before decoding anything
            raise self.engine.failure
        options = self._tiling_options(call)
        vir_mode = self._vir_mode(call.vir_mode)
        self._check_image_count(call)
        per_image = [self._image_options(options, image.max_tiles) for image in call.images]
        applied = vir_mode if self.engine.has_router else None
        count = len(call.images)
        lookup = await self._lookup(call, per_image, applied)
        try:
            hits = lookup.hits if lookup is not None else {}
            if len(hits) == count:
                todo: list[int] = []
            elif applied is VirMode.AUTO:
                # Routing is per request: one image to encode means encoding all of them.
                todo = list(range(count))
            else:
                todo = [index for index in range(count) if index not in hits]
            prepared = await self._prepare(call, per_image, todo)
            self._check_tiles(prepared, hits, count)
            async for index, encoded in self._encode_in_order(call, vir_mode, prepared, hits):
                if lookup is not None:
                    if encoded.from_cache:
                        metrics.embedding_cache_hits.inc()
                    else:
                        metrics.embedding_cache_misses.inc()
                        lookup.store(index, _cached(encoded))
                metrics.queue_wait.observe(encoded.stats.queue_ms / 1000)
                metrics.images.inc()
                metrics.visual_tokens.inc(encoded.num_visual_tokens)
                yield encoded
        finally:
            if lookup is not None:
                lookup.release()

    async def _encode_in_order(
        self,
        call: EncodeCall,
        vir_mode: VirMode,
        prepared: dict[int, PreparedImage],
        hits: dict[int, CachedImage],
    ) -> AsyncGenerator[tuple[int, EncodedImage], None]:
        """(index, image) in request order: the prepared images through the engine, the
        others from the cache."""
        if not prepared:  # every image is a hit
            for index in range(len(call.images)):
                yield index, self._from_cache(hits[index])
            return
        todo = sorted(prepared)
        stream = self.engine.encode_request(
            [prepared[index] for index in todo], call.request_id, vir_mode, call.vir_threshold
        )
        async with contextlib.aclosing(stream) as encoded_images:
            engine_images = aiter(encoded_images)
            for index in range(len(call.images)):
                if index in prepared:
                    yield index, await anext(engine_images)
                else:
                    yield index, self._from_cache(hits[index])

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


def _cached(encoded: EncodedImage) -> CachedImage:
    return CachedImage(
        embeddings=encoded.embeddings,
        tokens_per_tile=tuple(encoded.tokens_per_tile),
        grid=encoded.grid,
        vir_mode=encoded.vir_mode,
    )

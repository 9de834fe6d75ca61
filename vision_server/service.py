"""The gRPC servicer: validates requests, prepares images, streams embeddings. No tensor math."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from protos import codec
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc
from vision_server.checkpoints.spec import CheckpointSpec
from vision_server.engine import EncodedImage, EncoderEngine
from vision_server.errors import (
    InvalidImage,
    InvalidRequest,
    TooManyImages,
    VisionError,
    grpc_status,
)
from vision_server.preprocess import ImageLimits, PreparedImage, TilingOptions, prepare_image
from vision_server.settings import VisionSettings

logger = logging.getLogger(__name__)


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(
        self,
        engine: EncoderEngine,
        spec: CheckpointSpec,
        settings: VisionSettings,
        model_id: str,
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.settings = settings
        self.model_id = model_id
        self.limits = ImageLimits(
            max_image_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        self._preprocess_pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_workers, thread_name_prefix="preprocess"
        )

    def close(self) -> None:
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)

    # ---- validation -------------------------------------------------------------------------

    def _tiling_options(self, options: vision_pb2.EncodeOptions) -> TilingOptions:
        max_tiles = options.max_tiles or self.spec.max_tiles
        if max_tiles > self.settings.max_tiles_limit:
            raise InvalidRequest(
                f"max_tiles={max_tiles} exceeds this service's limit of "
                f"{self.settings.max_tiles_limit}"
            )
        if max_tiles < self.spec.min_tiles:
            raise InvalidRequest(f"max_tiles must be at least {self.spec.min_tiles}")
        if options.HasField("vir_threshold") and not 0.0 <= options.vir_threshold <= 1.0:
            raise InvalidRequest(f"vir_threshold must be in [0, 1], got {options.vir_threshold}")
        if options.vir_mode not in vision_pb2.VirMode.values():
            raise InvalidRequest(f"unknown vir_mode {options.vir_mode}")
        return TilingOptions(
            min_tiles=self.spec.min_tiles,
            max_tiles=max_tiles,
            use_thumbnail=self.spec.use_thumbnail,
            tile_size=self.spec.vision.image_size,
            mean=self.spec.image_mean,
            std=self.spec.image_std,
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

    async def _prepare(
        self, request: vision_pb2.EncodeRequest, options: TilingOptions
    ) -> list[PreparedImage]:
        if not request.images:
            raise InvalidRequest("request has no images")
        if len(request.images) > self.settings.max_images_per_request:
            raise TooManyImages(
                f"{len(request.images)} images in one request; the limit is "
                f"{self.settings.max_images_per_request}"
            )
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(
                self._preprocess_pool,
                prepare_image,
                image.data,
                self.limits,
                self._image_options(options, image.max_tiles),
            )
            for image in request.images
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        prepared: list[PreparedImage] = []
        for index, result in enumerate(results):
            if isinstance(result, InvalidImage):
                raise InvalidImage(f"image {index}: {result}")
            if isinstance(result, BaseException):
                raise result
            prepared.append(result)
        return prepared

    # ---- RPCs ---------------------------------------------------------------------------------

    def _header(self, index: int, encoded: EncodedImage) -> vision_pb2.EncodeResponse:
        return vision_pb2.EncodeResponse(
            header=vision_pb2.ImageHeader(
                image_index=index,
                num_tiles=len(encoded.tokens_per_tile),
                tokens_per_tile=encoded.tokens_per_tile,
                num_visual_tokens=encoded.num_visual_tokens,
                hidden_size=int(encoded.embeddings.shape[1]),
                dtype=codec.wire_dtype(encoded.embeddings.dtype),
                num_bytes=encoded.embeddings.numel() * encoded.embeddings.element_size(),
                grid_columns=encoded.grid.columns,
                grid_rows=encoded.grid.rows,
                has_thumbnail=encoded.grid.thumbnail,
                queue_ms=encoded.stats.queue_ms,
                encode_ms=encoded.stats.encode_ms,
            )
        )

    async def Encode(  # noqa: N802 (gRPC method name)
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        tasks: list[asyncio.Task[EncodedImage]] = []
        try:
            options = self._tiling_options(request.options)
            images = await self._prepare(request, options)
            # All images queue at once so they can share passes; results stream in order.
            tasks = [asyncio.create_task(self.engine.encode(image, request_id)) for image in images]
            for index, task in enumerate(tasks):
                encoded = await task
                yield self._header(index, encoded)
                for offset, data in codec.encode_chunks(
                    encoded.embeddings, self.settings.chunk_bytes
                ):
                    yield vision_pb2.EncodeResponse(
                        chunk=vision_pb2.EmbeddingChunk(image_index=index, offset=offset, data=data)
                    )
            logger.debug("request %s: %d images encoded", request_id, len(images))
        except VisionError as exc:
            logger.info("request %s refused: %s", request_id, exc)
            await context.abort(grpc_status(exc), str(exc))
        except asyncio.CancelledError:
            logger.info("request %s cancelled by the client", request_id)
            raise
        except Exception:
            logger.exception("request %s failed", request_id)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the vision service")
        finally:
            for task in tasks:
                task.cancel()

    async def GetModelInfo(  # noqa: N802 (gRPC method name)
        self, request: vision_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.ModelInfo:
        spec = self.spec
        return vision_pb2.ModelInfo(
            model_id=self.model_id,
            checkpoint_layout=spec.layout.value,
            hidden_size=spec.llm_hidden_size,
            dtype=codec.wire_dtype(self.engine.dtype),
            tile_size=spec.vision.image_size,
            tokens_per_tile=spec.tokens_per_tile,
            compressed_tokens_per_tile=0,
            default_max_tiles=spec.max_tiles,
            max_tiles_limit=self.settings.max_tiles_limit,
            use_thumbnail=spec.use_thumbnail,
            vir_available=False,
            image_start_token=spec.image_tokens.start,
            image_context_token=spec.image_tokens.context,
            image_end_token=spec.image_tokens.end,
            device=str(self.engine.device),
        )

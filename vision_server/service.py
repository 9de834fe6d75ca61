"""The gRPC servicer: validates requests, prepares images, streams embeddings. No tensor math."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from protos import codec
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc
from vision_server import metrics
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
from vision_server.routing import VirMode
from vision_server.settings import VisionSettings

logger = logging.getLogger(__name__)


_WIRE_VIR = {
    None: vision_pb2.VIR_MODE_UNSPECIFIED,
    VirMode.AUTO: vision_pb2.VIR_MODE_AUTO,
    VirMode.OFF: vision_pb2.VIR_MODE_OFF,
    VirMode.MAX: vision_pb2.VIR_MODE_MAX,
}


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

    def _vir_mode(self, options: vision_pb2.EncodeOptions) -> VirMode:
        """The router mode to apply; refuses what the checkpoint cannot do."""
        requested = options.vir_mode
        if requested == vision_pb2.VIR_MODE_MAX and not self.engine.has_router:
            raise InvalidRequest(
                "vir='max' needs a Visual Resolution Router, and this checkpoint has none "
                "(not an InternVL3.5-Flash checkpoint); use 'auto' or 'off'"
            )
        return {
            vision_pb2.VIR_MODE_UNSPECIFIED: VirMode.AUTO,
            vision_pb2.VIR_MODE_AUTO: VirMode.AUTO,
            vision_pb2.VIR_MODE_OFF: VirMode.OFF,
            vision_pb2.VIR_MODE_MAX: VirMode.MAX,
        }[requested]

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
                vir_mode=_WIRE_VIR[encoded.vir_mode],
            )
        )

    async def Encode(  # noqa: N802 (gRPC method name)
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        started = time.perf_counter()
        status = grpc.StatusCode.OK
        tasks: list[asyncio.Task[EncodedImage]] = []
        try:
            options = self._tiling_options(request.options)
            vir_mode = self._vir_mode(request.options)
            threshold = (
                request.options.vir_threshold if request.options.HasField("vir_threshold") else None
            )
            images = await self._prepare(request, options)
            # All images queue at once so they can share passes; results stream in order.
            tasks = [
                asyncio.create_task(self.engine.encode(image, request_id, vir_mode, threshold))
                for image in images
            ]
            for index, task in enumerate(tasks):
                encoded = await task
                metrics.queue_wait.observe(encoded.stats.queue_ms / 1000)
                yield self._header(index, encoded)
                for offset, data in codec.encode_chunks(
                    encoded.embeddings, self.settings.chunk_bytes
                ):
                    metrics.embedding_bytes.inc(len(data))
                    yield vision_pb2.EncodeResponse(
                        chunk=vision_pb2.EmbeddingChunk(image_index=index, offset=offset, data=data)
                    )
                metrics.images.inc()
                metrics.visual_tokens.inc(encoded.num_visual_tokens)
            logger.debug("request %s: %d images encoded", request_id, len(images))
        except VisionError as exc:
            status = grpc_status(exc)
            logger.info("request %s refused: %s", request_id, exc)
            await context.abort(status, str(exc))
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            logger.info("request %s cancelled by the client", request_id)
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            logger.exception("request %s failed", request_id)
            await context.abort(status, "internal error in the vision service")
        finally:
            for task in tasks:
                task.cancel()
            metrics.requests.labels(status=status.name).inc()
            metrics.request_seconds.observe(time.perf_counter() - started)

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
            compressed_tokens_per_tile=spec.compressed_tokens_per_tile if spec.flash else 0,
            default_max_tiles=spec.max_tiles,
            max_tiles_limit=self.settings.max_tiles_limit,
            use_thumbnail=spec.use_thumbnail,
            vir_available=spec.flash is not None,
            image_start_token=spec.image_tokens.start,
            image_context_token=spec.image_tokens.context,
            image_end_token=spec.image_tokens.end,
            device=str(self.engine.device),
        )

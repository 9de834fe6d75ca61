"""The gRPC servicer: validates requests, prepares images, streams embeddings. No tensor math."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import torch

from protos import codec, messages, shm
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc
from vision_server import metrics, tracing
from vision_server.delivery import SharedMemoryDelivery, probe_nonce
from vision_server.errors import InvalidRequest, VisionError, error_detail, grpc_status
from vision_server.pipeline import VisionPipeline

logger = logging.getLogger(__name__)


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, pipeline: VisionPipeline, model_id: str) -> None:
        self.pipeline = pipeline
        self.engine = pipeline.engine
        self.spec = pipeline.spec
        self.settings = pipeline.settings
        self.model_id = model_id
        self.shared_memory = (
            shm.SegmentWriter() if self.settings.shared_memory and shm.available() else None
        )

    def close(self) -> None:
        self.pipeline.close()
        if self.shared_memory is not None:
            self.shared_memory.close()

    # ---- RPCs ---------------------------------------------------------------------------------

    async def Encode(  # noqa: N802 (gRPC method name)
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        request_id = request.request_id or uuid.uuid4().hex
        started = time.perf_counter()
        status = grpc.StatusCode.OK
        attributes = {
            "rpc.system": "grpc",
            "rpc.method": "Encode",
            "dvd.request_id": request_id,
            "dvd.images": len(request.images),
            "dvd.videos": len(request.videos),
        }
        traced = tracing.open_request(context.invocation_metadata(), attributes)
        failure: BaseException | None = None
        try:
            count = 0
            call = _call(request, request_id)
            delivery = SharedMemoryDelivery.open(self.shared_memory, request, request_id)
            digest = self.pipeline.checkpoint_digest
            # aclosing: when the call ends early, the images still queued are cancelled at once.
            async with contextlib.aclosing(self.pipeline.encode(call)) as items:
                async for item in items:
                    header = vision_pb2.EncodeResponse(
                        header=messages.header_to_wire(item, count, digest)
                    )
                    async for message in image_messages(
                        header, item.embeddings, delivery, self.settings.chunk_bytes
                    ):
                        yield message
                    count += 1
            logger.debug("request %s: %d images and videos encoded", request_id, count)
        except VisionError as exc:
            status = grpc_status(exc)
            failure = exc
            logger.info("request %s refused: %s", request_id, exc)
            await _abort(context, exc, str(exc))
        except asyncio.CancelledError as exc:
            status = grpc.StatusCode.CANCELLED
            failure = exc
            logger.info("request %s cancelled by the client", request_id)
            raise
        except Exception as exc:
            status = grpc.StatusCode.INTERNAL
            failure = exc
            logger.exception("request %s failed", request_id)
            await _abort(context, exc, "internal error in the vision service")
        finally:
            metrics.requests.labels(status=status.name).inc()
            metrics.request_seconds.observe(time.perf_counter() - started)
            tracing.close_request(traced, status.value[0], failure)

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
            checkpoint_digest=self.pipeline.checkpoint_digest,
            embedding_cache_bytes=(
                self.pipeline.cache.capacity_bytes if self.pipeline.cache is not None else 0
            ),
            shared_memory_nonce=probe_nonce(self.shared_memory, request.shared_memory_probe),
        )


async def image_messages(
    header: vision_pb2.EncodeResponse,
    embeddings: torch.Tensor,
    delivery: SharedMemoryDelivery | None,
    chunk_bytes: int,
) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
    """The stream messages of one image: its header, after its rows were written into the
    caller's shared memory, or its header followed by its rows as chunk messages."""
    num_bytes = header.header.num_bytes
    # Not current: it stays open across the yields below.
    span = tracing.start_span(
        "vision.deliver", {"dvd.item": header.header.image_index, "dvd.bytes": num_bytes}
    )
    failure: BaseException | None = None
    try:
        offset = await delivery.write(embeddings) if delivery is not None else None
        if offset is not None:
            header.header.shared_memory_offset = offset
            if span is not None:
                span.set_attribute("dvd.transport", "shared_memory")
            yield header
            metrics.embedding_bytes.labels(transport="shared_memory").inc(num_bytes)
            return
        if span is not None:
            span.set_attribute("dvd.transport", "grpc")
        yield header
        # Chunks go out pre-serialized (see add_vision_service): one copy each.
        for message in codec.encode_chunk_messages(
            embeddings, header.header.image_index, chunk_bytes
        ):
            yield message
        metrics.embedding_bytes.labels(transport="grpc").inc(num_bytes)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        tracing.end_span(span, failure)


def _call(request: vision_pb2.EncodeRequest, request_id: str) -> messages.EncodeCall:
    try:
        return messages.call_from_wire(request, request_id)
    except messages.ContractError as exc:
        raise InvalidRequest(str(exc), field=exc.field) from None


async def _abort(context: grpc.aio.ServicerContext, error: Exception, message: str) -> None:
    """End the call with ``error``'s status, its code and field in the trailing metadata."""
    await context.abort(
        grpc_status(error),
        message,
        trailing_metadata=messages.error_metadata(error_detail(error)),
    )


def _serialize_response(message: vision_pb2.EncodeResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def vision_service_handlers(servicer: VisionServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The method handlers of ``dvd.v1.VisionService``, as the generated helper builds them,
    except that Encode may yield already-serialized ``EncodeResponse`` bytes (the chunks)."""
    return {
        "Encode": grpc.unary_stream_rpc_method_handler(
            servicer.Encode,
            request_deserializer=vision_pb2.EncodeRequest.FromString,
            response_serializer=_serialize_response,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=vision_pb2.GetModelInfoRequest.FromString,
            response_serializer=vision_pb2.ModelInfo.SerializeToString,
        ),
    }


def add_vision_service(servicer: VisionServicer, server: grpc.aio.Server) -> None:
    """Register ``dvd.v1.VisionService`` on ``server``."""
    handlers = vision_service_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name

"""DvD's image encoder: the remote vision service over one gRPC channel.

A ``dns:///name:port`` target with round-robin load balancing spreads calls over every
address the name resolves to (several vision replicas behind one Compose/Kubernetes name).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_server import metrics
from llm_server.errors import APIError, BadRequest, InvalidImage, Overloaded, VisionUnavailable
from llm_server.vision.base import EncodeOptions, ImageInput, VirMode, VisualEmbedding
from protos import codec
from protos.dvd.v1 import vision_pb2

logger = logging.getLogger(__name__)

_VIR_MODES: dict[VirMode | None, vision_pb2.VirMode] = {
    None: vision_pb2.VIR_MODE_UNSPECIFIED,
    "auto": vision_pb2.VIR_MODE_AUTO,
    "off": vision_pb2.VIR_MODE_OFF,
    "max": vision_pb2.VIR_MODE_MAX,
}
_APPLIED_VIR: dict[int, VirMode | None] = {
    vision_pb2.VIR_MODE_UNSPECIFIED: None,
    vision_pb2.VIR_MODE_AUTO: "auto",
    vision_pb2.VIR_MODE_OFF: "off",
    vision_pb2.VIR_MODE_MAX: "max",
}


# Encode is idempotent: a call that fails with UNAVAILABLE before its first reply (a replica
# that just went away) is retried on another replica, twice at most, with a short backoff.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "dvd.v1.VisionService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 3,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def _to_api_error(error: grpc.aio.AioRpcError) -> APIError:
    """Map a vision-service failure to what the HTTP client should see."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidImage(details, param="messages")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"vision service is overloaded: {details}")
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    ):
        reason = (
            "did not answer in time"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED
            else "is unavailable"
        )
        return VisionUnavailable(f"vision service {reason} ({details or code.name}); retry later")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return BadRequest(details)
    return APIError(f"vision service error: {code.name}: {details}")


class GrpcImageEncoder:
    """Calls ``dvd.v1.VisionService/Encode`` and reassembles the streamed embeddings."""

    def __init__(self, target: str, *, timeout_s: float, expected_hidden_size: int) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.expected_hidden_size = expected_hidden_size
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.enable_retries", 1),
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.max_receive_message_length", 2 * codec.MAX_CHUNK_BYTES),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                # Notice a dead replica quickly, and come back quickly when it returns.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ],
        )
        # Encode's messages arrive as raw bytes: codec.parse_response reads chunks without
        # copying them through protobuf objects.
        self._encode = self._channel.unary_stream(
            "/dvd.v1.VisionService/Encode",
            request_serializer=vision_pb2.EncodeRequest.SerializeToString,
            response_deserializer=None,
        )
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def ready(self) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def encode(
        self, images: Sequence[ImageInput], options: EncodeOptions, request_id: str
    ) -> list[VisualEmbedding]:
        request = vision_pb2.EncodeRequest(
            request_id=request_id,
            images=[
                vision_pb2.Image(data=image.data, max_tiles=image.max_tiles or 0)
                for image in images
            ],
            options=vision_pb2.EncodeOptions(
                max_tiles=options.max_tiles or 0,
                vir_mode=_VIR_MODES[options.vir],
                vir_threshold=options.vir_threshold,
            ),
        )
        call = self._encode(request, timeout=self.timeout_s)
        results: list[VisualEmbedding] = []
        header: vision_pb2.ImageHeader | None = None
        assembler: codec.EmbeddingAssembler | None = None
        header_at = 0.0
        try:
            # Cancelling this coroutine (client gone) cancels the call on the vision service.
            async for raw in call:
                message = codec.parse_response(raw)
                if isinstance(message, vision_pb2.ImageHeader):
                    header = message
                    self._check_header(header, len(results))
                    header_at = time.perf_counter()
                    metrics.vision_queue_wait.observe(header.queue_ms / 1000)
                    metrics.vision_encode.observe(header.encode_ms / 1000)
                    assembler = codec.EmbeddingAssembler(
                        (header.num_visual_tokens, header.hidden_size), header.dtype
                    )
                    continue
                image_index, offset, data = message
                if assembler is None or header is None or image_index != header.image_index:
                    raise APIError("vision service sent embedding bytes without a matching header")
                assembler.add(offset, data)
                metrics.embedding_bytes.inc(len(data))
                if assembler.complete:
                    metrics.vision_transfer.observe(time.perf_counter() - header_at)
                    results.append(
                        VisualEmbedding(
                            assembler.tensor(),
                            list(header.tokens_per_tile),
                            header.full_tokens_per_tile or max(header.tokens_per_tile),
                            _APPLIED_VIR.get(header.vir_mode),
                        )
                    )
                    assembler = None
        except grpc.aio.AioRpcError as exc:
            raise _to_api_error(exc) from exc
        except codec.CodecError as exc:
            raise APIError(f"vision service sent malformed embeddings: {exc}") from exc
        if len(results) != len(images):
            raise APIError(f"vision service returned {len(results)} of {len(images)} images")
        return results

    def _check_header(self, header: vision_pb2.ImageHeader, expected_index: int) -> None:
        if header.image_index != expected_index:
            raise APIError(
                f"vision service sent image {header.image_index}, expected {expected_index}"
            )
        if header.hidden_size != self.expected_hidden_size:
            raise APIError(
                f"vision service embeddings are {header.hidden_size} wide but the language model "
                f"is {self.expected_hidden_size} wide: the two services run different models"
            )
        if sum(header.tokens_per_tile) != header.num_visual_tokens:
            raise APIError("vision service header is inconsistent (tokens per tile vs total)")

    async def close(self) -> None:
        await self._channel.close()

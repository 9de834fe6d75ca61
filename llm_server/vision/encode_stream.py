"""Reading one Encode call's reply: per item a header, then its rows from shared memory or
from the chunk messages that follow, each checked against what the header announced and what
this language model can take."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable

import torch

from llm_server import metrics
from llm_server.errors import VisionBadResponse, VisionUnavailable
from llm_server.settings import EmbeddingTransport
from llm_server.vision.arena import EmbeddingArena, Reservation
from llm_server.vision.model_identity import ModelIdentityGate
from protos import codec, messages
from protos.dvd.v1 import vision_pb2
from protos.messages import VisualEmbedding


async def receive(
    call: AsyncIterable[bytes],
    gate: ModelIdentityGate,
    transport: EmbeddingTransport,
    arena: EmbeddingArena | None,
    reservation: Reservation | None,
) -> list[VisualEmbedding]:
    """The call's items in the order the vision service sent them; raises
    ``VisionBadResponse`` for a stream that breaks the contract."""
    results: list[VisualEmbedding] = []
    header: vision_pb2.ImageHeader | None = None
    assembler: codec.EmbeddingAssembler | None = None
    header_at = 0.0
    # Cancelling this coroutine (client gone) cancels the call on the vision service.
    async for raw in call:
        message = codec.parse_response(raw)
        if isinstance(message, vision_pb2.ImageHeader):
            if assembler is not None:
                raise VisionBadResponse("vision service started an image before finishing the last")
            header = message
            check_header(header, len(results), gate)
            header_at = time.perf_counter()
            metrics.vision_queue_wait.observe(header.queue_ms / 1000)
            metrics.vision_encode.observe(header.encode_ms / 1000)
            shape = (header.num_visual_tokens, header.hidden_size)
            if codec.tensor_bytes(shape, header.dtype) != header.num_bytes:
                raise VisionBadResponse(
                    f"vision service header announces {header.num_bytes} bytes for a "
                    f"{shape[0]}x{shape[1]} tensor"
                )
            if header.HasField("shared_memory_offset"):
                embeddings = _read_shared(header, shape, arena, reservation)
                metrics.embedding_bytes.labels(transport="shared_memory").inc(header.num_bytes)
                metrics.vision_transfer.observe(time.perf_counter() - header_at)
                results.append(messages.item_from_wire(header, embeddings))
                continue
            if transport == "shared-memory":
                raise VisionUnavailable(
                    "the vision service streamed embeddings instead of writing them to "
                    "shared memory (is it on another host, or started with "
                    "--no-shared-memory?); use --embedding-transport auto or grpc"
                )
            assembler = codec.EmbeddingAssembler(shape, header.dtype)
            continue
        image_index, offset, data = message
        if assembler is None or header is None or image_index != header.image_index:
            raise VisionBadResponse("vision service sent embedding bytes without a matching header")
        assembler.add(offset, data)
        metrics.embedding_bytes.labels(transport="grpc").inc(len(data))
        if assembler.complete:
            metrics.vision_transfer.observe(time.perf_counter() - header_at)
            results.append(messages.item_from_wire(header, assembler.tensor()))
            assembler = None
    return results


def _read_shared(
    header: vision_pb2.ImageHeader,
    shape: tuple[int, int],
    arena: EmbeddingArena | None,
    reservation: Reservation | None,
) -> torch.Tensor:
    """The rows the vision service wrote into the call's range, copied out while the range is
    still the call's."""
    if reservation is None or arena is None:
        raise VisionBadResponse("vision service wrote to shared memory it was not given")
    rows = arena.rows(reservation, header.shared_memory_offset, header.num_bytes)
    embeddings = codec.tensor_from_bytes(rows, shape, header.dtype)
    if not arena.holds(reservation):  # copied while still ours?
        raise VisionBadResponse("the shared-memory range changed hands")
    return embeddings


def check_header(
    header: vision_pb2.ImageHeader, expected_index: int, gate: ModelIdentityGate
) -> None:
    """Refuse a header out of order, of another width or checkpoint, or inconsistent."""
    if header.image_index != expected_index:
        raise VisionBadResponse(
            f"vision service sent image {header.image_index}, expected {expected_index}"
        )
    if header.hidden_size != gate.expected_hidden_size:
        raise VisionBadResponse(
            f"vision service embeddings are {header.hidden_size} wide but the language model "
            f"is {gate.expected_hidden_size} wide: the two services run different models"
        )
    if sum(header.tokens_per_tile) != header.num_visual_tokens:
        raise VisionBadResponse("vision service header is inconsistent (tokens per tile vs total)")
    gate.check_digest(header.checkpoint_digest, None)

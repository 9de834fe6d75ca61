"""How an encoded image's rows reach the caller: written into its shared memory when it lives
on this host, or streamed as chunk messages over the gRPC call.

The servicer asks ``SharedMemoryDelivery`` first; whatever it declines (no target, another
host, a range too small, a segment that is not a whole regular file of ours, a range its owner
has released) goes out as chunks, so a request never fails for lack of shared memory.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from protos import codec, shm
from protos.dvd.v1 import vision_pb2

logger = logging.getLogger(__name__)


# Images up to this size are copied on the event loop (see ``SharedMemoryDelivery.write``).
INLINE_WRITE_BYTES = 8 << 20


class SharedMemoryDelivery:
    """Writes one call's images, one after the other, into the caller's reserved range."""

    def __init__(self, writer: shm.SegmentWriter, target: vision_pb2.SharedMemoryTarget) -> None:
        self._writer = writer
        self._target = target
        self._used = 0

    @classmethod
    def open(
        cls, writer: shm.SegmentWriter | None, request: vision_pb2.EncodeRequest, request_id: str
    ) -> SharedMemoryDelivery | None:
        """The delivery for ``request``, or None when it names no usable segment (shared
        memory off here, the segment on another host, a wrong token or range)."""
        if writer is None or not request.HasField("shared_memory"):
            return None
        target = request.shared_memory
        try:
            writer.check(
                target.segment, target.token, target.offset, target.capacity, target.generation
            )
        except shm.SharedMemoryError as exc:
            logger.debug("request %s: streaming embeddings (%s)", request_id, exc)
            return None
        return cls(writer, target)

    async def write(self, embeddings: torch.Tensor) -> int | None:
        """Write one image's rows; its offset within the range, or None if they do not fit."""
        raw = codec.little_endian_bytes(embeddings)
        offset = self._used
        if offset + raw.numel() > self._target.capacity:
            return None
        target = self._target
        at = target.offset + offset
        try:
            if raw.numel() <= INLINE_WRITE_BYTES:
                # About 0.2 ms for 1.7 MB, 0.6 ms for 6.8 MB: no more than handing it to a
                # thread.
                self._writer.write(target.segment, at, raw, target.generation)
            else:
                # Tens of MB: off the event loop (numpy releases the GIL while copying).
                await asyncio.to_thread(
                    self._writer.write, target.segment, at, raw, target.generation
                )
        except shm.SharedMemoryError as exc:
            # Released (the caller gave up), unlinked, truncated: the rows go as chunks.
            logger.debug("streaming an image instead of writing it to %s: %s", target.segment, exc)
            return None
        self._used += raw.numel()
        return offset


def probe_nonce(writer: shm.SegmentWriter | None, segment: str) -> bytes:
    """The nonce in the caller's probe segment, for ``ModelInfo.shared_memory_nonce``: proof
    that this service sees the caller's shared memory. Empty when it cannot read it (another
    host or IPC namespace, shared memory off here, not a probe segment of our user)."""
    if writer is None or not segment:
        return b""
    try:
        return writer.read_probe(segment)
    except shm.SharedMemoryError as exc:
        logger.debug("shared-memory probe %s not readable: %s", segment, exc)
        return b""

"""Whether, and where, the vision service may write a call's rows into this process's shared
memory instead of streaming them.

``transport``: ``auto`` offers shared memory once the vision service has proved it sees this
process's ``/dev/shm``, ``grpc`` never does, ``shared-memory`` requires it. The proof is a
probe segment named in ``GetModelInfo``, whose random nonce the service must read back; until
it succeeds (never, across hosts or pods) no shared memory is reserved and no segment is named
in calls. How large a call's range is: ``llm_server.vision.shm_sizing``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from llm_server import metrics
from llm_server.errors import VisionUnavailable
from llm_server.settings import EmbeddingTransport
from llm_server.vision.arena import EmbeddingArena, Reservation
from llm_server.vision.shm_sizing import rows_bytes
from protos import shm
from protos.dvd.v1 import vision_pb2
from protos.messages import EncodeCall

logger = logging.getLogger(__name__)


class SharedMemoryOffer:
    """The arena calls reserve their ranges in, made once shared memory is proven (or at
    start-up, when it is required)."""

    def __init__(self, target: str, transport: EmbeddingTransport, size_bytes: int) -> None:
        self.target = target
        self.transport = transport
        self.size_bytes = size_bytes
        self.arena = _open_arena(transport, size_bytes)
        # Whether a model check proved that the vision service sees our /dev/shm. It stays
        # true: replicas behind the name that do not see it stream, call by call.
        self.proven = False
        self._arena_task: asyncio.Task[None] | None = None

    def probe(self) -> shm.ProbeSegment | None:
        """A probe for the next model check, until a vision service has read one."""
        return _new_probe() if self.transport == "auto" and self.arena is None else None

    async def accept_probe(self, probe: shm.ProbeSegment, info: vision_pb2.ModelInfo) -> None:
        """Offer shared memory from now on if the vision service read the probe's nonce, and
        make the arena for it."""
        if not secrets.compare_digest(info.shared_memory_nonce, probe.nonce):
            return  # another host or pod, or shared memory off there: calls stream
        if not self.proven:
            logger.info("vision service at %s sees this host's shared memory", self.target)
        self.proven = True
        if self.arena is None:
            if self._arena_task is None or self._arena_task.done():
                self._arena_task = asyncio.get_running_loop().create_task(
                    self._create_arena(), name="vision-shared-memory"
                )
            # Shielded: a check that times out meanwhile leaves the arena to be finished.
            await asyncio.shield(self._arena_task)

    async def _create_arena(self) -> None:
        # Reserving the pages (posix_fallocate of --shared-memory-mb) takes tens of ms.
        try:
            arena = await asyncio.to_thread(EmbeddingArena, self.size_bytes)
        except shm.SharedMemoryError as exc:
            logger.info("embeddings will be streamed over gRPC: %s", exc)
            return
        self.arena = arena
        _log_arena(arena)

    async def reserve(
        self, call: EncodeCall, info: vision_pb2.ModelInfo | None
    ) -> Reservation | None:
        """A shared-memory range large enough for the most rows the call can produce; None
        when shared memory is not offered for it (its rows stream)."""
        if self.arena is None or info is None:
            return None
        if self.transport == "auto" and not self.proven:
            return None
        size = await rows_bytes(call, info)
        if size is None:
            return None
        reservation = self.arena.reserve(size)
        if reservation is None:
            metrics.shared_memory_full.inc()
            if self.transport == "shared-memory":
                raise VisionUnavailable("shared memory for embeddings is full; retry later")
        return reservation

    def target_of(self, reservation: Reservation) -> vision_pb2.SharedMemoryTarget:
        """Where the call's request tells the vision service to write."""
        assert self.arena is not None  # a reservation comes from the arena
        return vision_pb2.SharedMemoryTarget(
            segment=self.arena.segment.name,
            token=self.arena.segment.token,
            offset=reservation.offset,
            capacity=reservation.size,
            generation=reservation.generation,
        )

    def release(self, reservation: Reservation) -> None:
        # Even if the vision service is still writing: the range's stamp is cleared first, so
        # no late write can land in it once it is reserved again.
        if self.arena is not None:
            self.arena.release(reservation)

    async def close(self) -> None:
        if self._arena_task is not None:
            await self._arena_task
        if self.arena is not None:
            self.arena.close()


def _open_arena(transport: EmbeddingTransport, size_bytes: int) -> EmbeddingArena | None:
    """The arena to create at start-up: only when shared memory is required (a full
    ``/dev/shm`` then stops the service at once). ``auto`` creates it once a vision service
    has proved it sees it; until then it only unlinks what dead processes left behind."""
    if transport == "auto" and shm.available():
        shm.reclaim_orphans()
    if transport != "shared-memory":
        return None
    arena = EmbeddingArena(size_bytes)
    _log_arena(arena)
    return arena


def _log_arena(arena: EmbeddingArena) -> None:
    logger.info(
        "offering the vision service %d MiB of shared memory (%s) for embeddings",
        arena.size >> 20,
        arena.segment.name,
    )


def _new_probe() -> shm.ProbeSegment | None:
    """A probe segment for the next model check; None where this host has no shared memory."""
    if not shm.available():
        return None
    try:
        return shm.ProbeSegment()
    except shm.SharedMemoryError as exc:
        logger.info("no shared-memory probe: %s", exc)
        return None

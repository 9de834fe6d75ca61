"""The receiving end of the same-host transport: one shared-memory segment, cut into byte
ranges that Encode calls reserve for the vision service to write their embeddings into.

First fit over a sorted free list; all calls run on the event loop, so no lock is needed. A
range whose call ended abnormally (cancelled, failed) is held back for a while before reuse:
the vision service may still be finishing a write into it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from dataclasses import dataclass

import torch

from protos import shm

logger = logging.getLogger(__name__)

ALIGNMENT = 64 * 1024
# Longer than any single write of the vision service takes.
QUARANTINE_S = 30.0


@dataclass(frozen=True)
class Reservation:
    offset: int
    size: int


class EmbeddingArena:
    """Byte ranges of one owned segment, reserved and released by Encode calls."""

    def __init__(self, size_bytes: int) -> None:
        shm.reclaim_orphans()
        size = size_bytes // ALIGNMENT * ALIGNMENT
        self.segment = shm.OwnedSegment(size)
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted by offset
        self._held_back: set[asyncio.TimerHandle] = set()

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    def reserve(self, num_bytes: int) -> Reservation | None:
        """A range of at least ``num_bytes``, or None when none is free (the call streams)."""
        need = max(ALIGNMENT, -(-num_bytes // ALIGNMENT) * ALIGNMENT)
        for index, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[index]
                else:
                    self._free[index] = (offset + need, size - need)
                return Reservation(offset, need)
        return None

    def release(self, reservation: Reservation) -> None:
        """Give a range back (its call is over and nothing writes into it any more)."""
        entry = (reservation.offset, reservation.size)
        index = bisect.bisect(self._free, entry)
        self._free.insert(index, entry)
        # Merge with the neighbours, so that large ranges form again.
        if index + 1 < len(self._free):
            offset, size = self._free[index]
            next_offset, next_size = self._free[index + 1]
            if offset + size == next_offset:
                self._free[index : index + 2] = [(offset, size + next_size)]
        if index > 0:
            prev_offset, prev_size = self._free[index - 1]
            offset, size = self._free[index]
            if prev_offset + prev_size == offset:
                self._free[index - 1 : index + 1] = [(prev_offset, prev_size + size)]

    def release_later(self, reservation: Reservation, delay_s: float | None = None) -> None:
        """Give a range back after ``delay_s`` (default ``QUARANTINE_S``): for calls that ended
        before the vision service said it was done writing."""
        loop = asyncio.get_running_loop()

        def release() -> None:
            self._held_back.discard(handle)
            self.release(reservation)

        handle = loop.call_later(QUARANTINE_S if delay_s is None else delay_s, release)
        self._held_back.add(handle)

    def rows(self, reservation: Reservation, offset: int, num_bytes: int) -> torch.Tensor:
        """A view of ``num_bytes`` written at ``offset`` within ``reservation``."""
        if offset < 0 or offset + num_bytes > reservation.size:
            raise shm.SharedMemoryError(
                f"the vision service wrote {num_bytes} bytes at {offset}, outside the "
                f"{reservation.size}-byte range it was given"
            )
        return self.segment.rows(reservation.offset + offset, num_bytes)

    def close(self) -> None:
        for handle in self._held_back:
            handle.cancel()
        self._held_back.clear()
        self.segment.close()

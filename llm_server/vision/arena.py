"""The receiving end of the same-host transport: one shared-memory segment, cut into byte
ranges that Encode calls reserve for the vision service to write their embeddings into.

First fit over a sorted free list; all calls run on the event loop, so no lock is needed here.
Each reservation gets a new generation, stamped on its slots in the segment; releasing a range
clears the stamp first, so a write meant for a call that is over (a cancelled call whose
vision service is still working, a stopped process that resumes) can never land in a range
given to another call. A range that a writer is copying into at that moment cannot be cleared
yet: it is held back and tried again at the next reservation.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from protos import shm

logger = logging.getLogger(__name__)

ALIGNMENT = shm.SLOT_BYTES


@dataclass(frozen=True)
class Reservation:
    offset: int
    size: int
    # Stamped on the range's slots while the reservation lasts; writers must present it.
    generation: int


class EmbeddingArena:
    """Byte ranges of one owned segment, reserved and released by Encode calls."""

    def __init__(self, size_bytes: int, directory: Path = shm.SHM_DIR) -> None:
        shm.reclaim_orphans(directory)
        size = size_bytes // ALIGNMENT * ALIGNMENT
        self.segment = shm.OwnedSegment(size, directory)
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted by offset
        self._held_back: list[Reservation] = []
        self._generation = 0

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    def reserve(self, num_bytes: int) -> Reservation | None:
        """A range of at least ``num_bytes``, or None when none is free (the call streams)."""
        self.release_held_back()
        need = max(ALIGNMENT, -(-num_bytes // ALIGNMENT) * ALIGNMENT)
        for index, (offset, size) in enumerate(self._free):
            if size < need:
                continue
            self._generation += 1
            if not self.segment.set_generation(offset, need, self._generation):
                continue  # a late writer is reading these slots' (cleared) stamp right now
            if size == need:
                del self._free[index]
            else:
                self._free[index] = (offset + need, size - need)
            return Reservation(offset, need, self._generation)
        return None

    def release(self, reservation: Reservation) -> None:
        """Give a range back, whether its call succeeded or not: from now on no write for it
        lands. A write still copying into it holds it back until the next reservation."""
        if not self.segment.set_generation(reservation.offset, reservation.size, 0):
            self._held_back.append(reservation)
            return
        self._insert_free(reservation.offset, reservation.size)

    def release_held_back(self) -> None:
        """Try again to release the ranges writers were copying into."""
        held_back, self._held_back = self._held_back, []
        for reservation in held_back:
            self.release(reservation)

    @property
    def held_back(self) -> list[Reservation]:
        return list(self._held_back)

    def _insert_free(self, offset: int, size: int) -> None:
        entry = (offset, size)
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

    def holds(self, reservation: Reservation) -> bool:
        """Whether the segment still stamps ``reservation``'s slots with its generation."""
        return self.segment.holds(reservation.offset, reservation.size, reservation.generation)

    def rows(self, reservation: Reservation, offset: int, num_bytes: int) -> torch.Tensor:
        """A view of ``num_bytes`` written at ``offset`` within ``reservation``."""
        if offset < 0 or offset + num_bytes > reservation.size:
            raise shm.SharedMemoryError(
                f"the vision service wrote {num_bytes} bytes at {offset}, outside the "
                f"{reservation.size}-byte range it was given"
            )
        return self.segment.rows(reservation.offset + offset, num_bytes)

    def close(self) -> None:
        self.segment.close()

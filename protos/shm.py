"""Same-host embedding transport: shared-memory segments that carry embedding rows.

When both services share a host (and an IPC namespace), moving embeddings through a TCP socket
is pure overhead. The language service then owns a POSIX shared-memory segment (a file under
``/dev/shm``), reserves a byte range of it for each Encode call, and names that range in the
request. The vision service writes each image's rows straight into it and sends only the
header over gRPC. The receiver owns the memory from start to end, so no buffer is ever
"returned": a crashed vision service leaves nothing behind, and a crashed receiver's segment
is unlinked by the next receiver that starts on the host.

Segment layout: a 64-byte header, then the data area.

    bytes 0-7    magic ``DVDSHM01``
    bytes 8-23   token: 16 random bytes; a writer must present them, so only a process that
                 can already read the segment can write into it
    bytes 24-31  owner pid (little-endian), with the owner's pid namespace in the name

Rows are written as the codec defines them (row-major, little-endian); offsets in requests and
headers are relative to the data area. Only this module knows the layout.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import struct
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from protos import codec

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "dvd-emb-"
MAGIC = b"DVDSHM01"
TOKEN_BYTES = 16
HEADER_BYTES = 64
_NAME = re.compile(r"^dvd-emb-(?P<pidns>\d+)-(?P<pid>\d+)-[0-9a-f]{8}$")


class SharedMemoryError(OSError):
    """A segment cannot be created, opened, or does not hold what its request says."""


def available() -> bool:
    """Whether this host offers POSIX shared memory as files under ``/dev/shm`` (Linux)."""
    return sys.platform.startswith("linux") and SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def _pid_namespace() -> int:
    """Identifies this process's pid namespace, so that a receiver only ever judges the
    liveness of segment owners whose pids it can see (containers sharing /dev/shm may not
    share pids)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def reclaim_orphans() -> list[str]:
    """Unlink the segments whose owner (in this pid namespace) is no longer running.

    Called when a receiver starts: a receiver killed with SIGKILL never unlinks its segment.
    """
    if not available():
        return []
    namespace = str(_pid_namespace())
    removed = []
    for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}*"):
        match = _NAME.match(path.name)
        if not match or match["pidns"] != namespace or _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    if removed:
        logger.info("unlinked %d shared-memory segments of exited processes", len(removed))
    return removed


class OwnedSegment:
    """A segment this process created and owns (the receiver's side).

    The pages are reserved up front (``posix_fallocate``): a full ``/dev/shm`` fails here with
    an error, not later with SIGBUS in the middle of a write.
    """

    def __init__(self, data_bytes: int) -> None:
        if not available():
            raise SharedMemoryError("POSIX shared memory (/dev/shm) is not available here")
        self.name = f"{SEGMENT_PREFIX}{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.data_bytes = data_bytes
        path = SHM_DIR / self.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = HEADER_BYTES + data_bytes
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise SharedMemoryError(f"cannot reserve {size} bytes in {SHM_DIR}: {exc}") from exc
        os.close(fd)
        self._map[:HEADER_BYTES] = (MAGIC + self.token + struct.pack("<Q", os.getpid())).ljust(
            HEADER_BYTES, b"\0"
        )
        self._closed = False

    def rows(self, offset: int, num_bytes: int) -> torch.Tensor:
        """A ``uint8`` view (no copy) of ``num_bytes`` of the data area at ``offset``."""
        if offset < 0 or offset + num_bytes > self.data_bytes:
            raise SharedMemoryError(f"range {offset}+{num_bytes} is outside the segment")
        if num_bytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(
            self._map, dtype=torch.uint8, count=num_bytes, offset=HEADER_BYTES + offset
        )

    def close(self) -> None:
        """Unlink the segment and drop this process's mapping (views must be gone by then)."""
        if self._closed:
            return
        self._closed = True
        (SHM_DIR / self.name).unlink(missing_ok=True)
        with contextlib.suppress(BufferError):  # a live view keeps the mapping until freed
            self._map.close()


class _AttachedSegment:
    def __init__(self, name: str) -> None:
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR)
        try:
            stat = os.fstat(fd)
            if stat.st_size < HEADER_BYTES:
                raise SharedMemoryError(f"{name} is too small to be an embedding segment")
            self._map = mmap.mmap(fd, stat.st_size)
        finally:
            os.close(fd)
        self.name = name
        self.inode = stat.st_ino
        self.data_bytes = stat.st_size - HEADER_BYTES
        header = self._map[:HEADER_BYTES]
        if header[: len(MAGIC)] != MAGIC:
            self._map.close()
            raise SharedMemoryError(f"{name} is not an embedding segment")
        self.token = bytes(header[len(MAGIC) : len(MAGIC) + TOKEN_BYTES])

    def write(self, offset: int, payload: torch.Tensor) -> None:
        count = payload.numel()
        target = torch.frombuffer(
            self._map, dtype=torch.uint8, count=count, offset=HEADER_BYTES + offset
        )
        codec.copy_bytes(target, payload)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()


class SegmentWriter:
    """The writer's side: opens receivers' segments by name (kept open, a few at a time) and
    writes rows into the ranges their requests reserve."""

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, _AttachedSegment] = OrderedDict()

    def _segment(self, name: str) -> _AttachedSegment:
        if not _NAME.match(name):
            raise SharedMemoryError(f"{name!r} is not an embedding segment name")
        segment = self._open.get(name)
        if segment is not None:
            try:
                current = os.stat(SHM_DIR / name).st_ino
            except FileNotFoundError:
                current = None
            if current == segment.inode:
                self._open.move_to_end(name)
                return segment
            segment.close()  # unlinked or replaced since it was opened
            del self._open[name]
        self._drop_unlinked()
        try:
            segment = _AttachedSegment(name)
        except FileNotFoundError as exc:
            raise SharedMemoryError(f"segment {name} is not on this host") from exc
        except OSError as exc:
            if isinstance(exc, SharedMemoryError):
                raise
            raise SharedMemoryError(f"cannot open segment {name}: {exc}") from exc
        self._open[name] = segment
        while len(self._open) > self.max_open:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        return segment

    def _drop_unlinked(self) -> None:
        """Unmap segments whose owner has unlinked them (it exited): the mapping alone would
        keep their memory allocated."""
        for name, segment in list(self._open.items()):
            try:
                alive = os.stat(SHM_DIR / name).st_ino == segment.inode
            except FileNotFoundError:
                alive = False
            if not alive:
                segment.close()
                del self._open[name]

    @property
    def open_segments(self) -> list[str]:
        return list(self._open)

    def check(self, name: str, token: bytes, offset: int, capacity: int) -> None:
        """Raise ``SharedMemoryError`` unless ``name`` is a segment on this host that holds
        ``token`` and the range ``[offset, offset + capacity)`` lies inside it."""
        segment = self._segment(name)
        if not secrets.compare_digest(segment.token, token):
            raise SharedMemoryError(f"token mismatch for segment {name}")
        if offset < 0 or capacity < 0 or offset + capacity > segment.data_bytes:
            raise SharedMemoryError(f"range {offset}+{capacity} is outside segment {name}")

    def write(self, name: str, offset: int, payload: torch.Tensor) -> None:
        """Copy ``payload`` (a flat ``uint8`` tensor) into ``name`` at data offset ``offset``.
        Call ``check`` first; this only re-checks the bounds."""
        segment = self._segment(name)
        if offset < 0 or offset + payload.numel() > segment.data_bytes:
            raise SharedMemoryError(f"write of {payload.numel()} bytes at {offset} overflows")
        segment.write(offset, payload)

    def close(self) -> None:
        for segment in self._open.values():
            segment.close()
        self._open.clear()

"""Same-host embedding transport: shared-memory segments that carry embedding rows.

When both services share a host (and an IPC namespace), moving embeddings through a TCP socket
is pure overhead. The language service then owns a POSIX shared-memory segment (a file under
``/dev/shm``), reserves a byte range of it for each Encode call, and names that range in the
request. The vision service writes each image's rows straight into it and sends only the
header over gRPC. The receiver owns the memory from start to end, so no buffer is ever
"returned": a crashed vision service leaves nothing behind.

Liveness. The owner holds an exclusive ``flock`` on its segment for as long as it lives; the
kernel drops it when the process dies, whatever pid namespace it ran in. A segment whose lock
can be taken is an orphan, and ``reclaim_orphans`` unlinks it (a container restarted with a
new pid namespace keeps its ``/dev/shm``, so pids say nothing). Names carry no pid.

Ranges. Each reservation has a generation, written into the control word of every 64-KiB
slot it covers. The owner changes control words only under an exclusive OFD lock on them; a
writer reads them under a shared lock on the same bytes, and holds it while it copies. So a
write for a call that is over either sees another generation and is refused, or holds the
lock, and then the owner cannot hand the range to another call until the copy is done.

Segment layout (little-endian):

    page 0       header: bytes 0-7 magic ``DVDSHM02``; 8-23 token (16 random bytes, which a
                 writer must present: only a process that can read the segment can write into
                 it); 24-31 size of the data area
    page 1...    control area: one 8-byte generation per slot of the data area (0: free),
                 padded to whole pages
    then         the data area

A probe segment (one page: magic ``DVDPRB02``, a 16-byte nonce) lets the language service
check that a vision service sees its ``/dev/shm`` before it reserves any memory: the vision
service reads the nonce back over gRPC. Rows are written as the codec defines them
(row-major, little-endian); offsets in requests and headers are relative to the data area.
Only this module knows the layout.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from protos import codec

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "dvd-emb-"
MAGIC = b"DVDSHM02"
PROBE_MAGIC = b"DVDPRB02"
TOKEN_BYTES = 16
PAGE_BYTES = 4096
HEADER_BYTES = PAGE_BYTES
PROBE_BYTES = PAGE_BYTES
# Reservations are whole slots; each slot has one generation word.
SLOT_BYTES = 64 * 1024
_WORD = struct.Struct("<Q")
_NAME = re.compile(r"^dvd-emb-[0-9a-f]{32}$")
_CREATE_ATTEMPTS = 8
# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
_FLOCK = struct.Struct("hhqqi4x")


class SharedMemoryError(OSError):
    """A segment cannot be created, opened, or does not hold what its request says."""


class StaleRange(SharedMemoryError):
    """The range no longer belongs to the call that names it (the call is over)."""


def available() -> bool:
    """Whether this host offers POSIX shared memory as files under ``/dev/shm`` (Linux, with
    open-file-description locks)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(fcntl, "F_OFD_SETLK")
        and SHM_DIR.is_dir()
        and os.access(SHM_DIR, os.W_OK)
    )


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass(frozen=True)
class _Layout:
    """Where things are in a segment whose data area is ``data_bytes`` long."""

    data_bytes: int

    @property
    def slots(self) -> int:
        return self.data_bytes // SLOT_BYTES

    @property
    def data_offset(self) -> int:
        return HEADER_BYTES + _round_up(self.slots * _WORD.size, PAGE_BYTES)

    @property
    def size(self) -> int:
        return self.data_offset + self.data_bytes

    def control(self, offset: int, length: int) -> tuple[int, int]:
        """(start, length) in the file of the control words of the slots that data bytes
        ``[offset, offset + length)`` touch."""
        first = offset // SLOT_BYTES
        end = _round_up(offset + max(length, 1), SLOT_BYTES) // SLOT_BYTES
        return HEADER_BYTES + first * _WORD.size, (end - first) * _WORD.size


def _words(generation: int, length: int) -> bytes:
    return _WORD.pack(generation) * (length // _WORD.size)


def _lock_range(fd: int, kind: int, start: int, length: int) -> bool:
    """Take an OFD lock (``F_RDLCK``/``F_WRLCK``) on bytes of the file, without waiting.
    OFD locks belong to the open file, not the process, so threads that each open the file
    exclude each other too; closing the descriptor drops them."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock_range(fd: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))


def _is_ours(status: os.stat_result) -> bool:
    """A regular file of this user: anything else under our names was planted by someone."""
    return stat.S_ISREG(status.st_mode) and status.st_uid == os.geteuid()


def _open_checked(path: Path, flags: int) -> int:
    """Open a segment without following links or blocking (a planted FIFO), and check that
    it is a regular file of ours."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise SharedMemoryError(f"segment {path.name} is not on this host") from exc
    except OSError as exc:
        raise SharedMemoryError(f"cannot open segment {path.name}: {exc}") from exc
    status = os.fstat(fd)
    if not _is_ours(status):
        os.close(fd)
        raise SharedMemoryError(
            f"{path.name} is not a regular file of uid {os.geteuid()} (mode "
            f"{stat.filemode(status.st_mode)}, uid {status.st_uid})"
        )
    return fd


def _check_allocated(name: str, status: os.stat_result, size: int) -> None:
    """Refuse a file of the wrong size, or with pages not allocated: touching a page past
    its end, or one that cannot be allocated in a full tmpfs, is a SIGBUS."""
    if status.st_size != size:
        raise SharedMemoryError(f"{name} is {status.st_size} bytes; its header says {size}")
    if status.st_blocks * 512 < size:
        raise SharedMemoryError(f"{name} is not fully allocated (a sparse file)")


def _create_locked(directory: Path, size: int) -> tuple[str, int]:
    """A new file of ``size`` allocated bytes under a fresh name, locked by this process:
    (name, descriptor). Keep the descriptor open: the lock is the owner's liveness."""
    for _ in range(_CREATE_ATTEMPTS):
        name = f"{SEGMENT_PREFIX}{secrets.token_hex(16)}"
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # planted under a name we drew: draw another
            continue
        except OSError as exc:
            raise SharedMemoryError(f"cannot create a segment in {directory}: {exc}") from exc
        if not _locked_in_place(fd, path):
            os.close(fd)  # a reclaimer took it between creation and lock: it unlinks it
            continue
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            path.unlink(missing_ok=True)
            os.close(fd)
            raise SharedMemoryError(f"cannot reserve {size} bytes in {directory}: {exc}") from exc
        return name, fd
    raise SharedMemoryError(f"no free segment name in {directory} after {_CREATE_ATTEMPTS} tries")


def _locked_in_place(fd: int, path: Path) -> bool:
    """Lock the new file; true if the lock was free and the name still points at the file
    (a reclaimer that got there first unlinks before it lets go)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def reclaim_orphans(directory: Path = SHM_DIR) -> list[str]:
    """Unlink the segments no live process holds: our regular files under our names whose
    ``flock`` can be taken. Anything else under our names is left alone.

    Called when a receiver starts: a receiver killed with SIGKILL never unlinks its segment,
    and one restarted in a new pid namespace cannot tell its old pids apart.
    """
    if not directory.is_dir():
        return []
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if _NAME.match(entry.name) and _reclaim(Path(entry.path)):
                removed.append(entry.name)
    if removed:
        logger.info("unlinked %d shared-memory segments no process holds", len(removed))
    return removed


def _reclaim(path: Path) -> bool:
    try:
        if not _is_ours(os.stat(path, follow_symlinks=False)):
            return False
        fd = _open_checked(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Still the file we locked (not unlinked and replaced meanwhile)?
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False
        path.unlink()
    except OSError:  # held by its live owner, or gone
        return False
    finally:
        os.close(fd)
    return True


class OwnedSegment:
    """A segment this process created and owns (the receiver's side).

    The pages are reserved up front (``posix_fallocate``): a full ``/dev/shm`` fails here with
    an error, not later with SIGBUS in the middle of a write. All methods run on one thread
    (the receiver's event loop).
    """

    def __init__(self, data_bytes: int, directory: Path = SHM_DIR) -> None:
        if not available():
            raise SharedMemoryError("POSIX shared memory (/dev/shm) is not available here")
        if data_bytes <= 0 or data_bytes % SLOT_BYTES:
            raise SharedMemoryError(f"the data area must be whole {SLOT_BYTES}-byte slots")
        self.layout = _Layout(data_bytes)
        self.data_bytes = data_bytes
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._directory = directory
        self.name, self._fd = _create_locked(directory, self.layout.size)
        try:
            self._map = mmap.mmap(self._fd, self.layout.size)
        except OSError as exc:
            (directory / self.name).unlink(missing_ok=True)
            os.close(self._fd)
            raise SharedMemoryError(f"cannot map segment {self.name}: {exc}") from exc
        header = MAGIC + self.token + _WORD.pack(data_bytes)
        self._map[: len(header)] = header
        self._closed = False

    def set_generation(self, offset: int, size: int, generation: int) -> bool:
        """Mark the slots of ``[offset, offset + size)`` as the range of ``generation`` (0:
        free). False when a writer is in the middle of a write there (try again later)."""
        start, length = self.layout.control(offset, size)
        if not _lock_range(self._fd, fcntl.F_WRLCK, start, length):
            return False
        try:
            self._map[start : start + length] = _words(generation, length)
        finally:
            _unlock_range(self._fd, start, length)
        return True

    def holds(self, offset: int, size: int, generation: int) -> bool:
        """Whether every slot of ``[offset, offset + size)`` still has ``generation``."""
        start, length = self.layout.control(offset, size)
        return self._map[start : start + length] == _words(generation, length)

    def rows(self, offset: int, num_bytes: int) -> torch.Tensor:
        """A ``uint8`` view (no copy) of ``num_bytes`` of the data area at ``offset``."""
        if offset < 0 or offset + num_bytes > self.data_bytes:
            raise SharedMemoryError(f"range {offset}+{num_bytes} is outside the segment")
        if num_bytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(
            self._map,
            dtype=torch.uint8,
            count=num_bytes,
            offset=self.layout.data_offset + offset,
        )

    def close(self) -> None:
        """Unlink the segment and drop this process's mapping (views must be gone by then)."""
        if self._closed:
            return
        self._closed = True
        (self._directory / self.name).unlink(missing_ok=True)
        os.close(self._fd)  # drops the lock after the name is gone
        with contextlib.suppress(BufferError):  # a live view keeps the mapping until freed
            self._map.close()


class ProbeSegment:
    """A one-page segment holding a random nonce: a vision service that reads it back
    (``GetModelInfoRequest.shared_memory_probe``) sees this process's ``/dev/shm``."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        if not available():
            raise SharedMemoryError("POSIX shared memory (/dev/shm) is not available here")
        self.nonce = secrets.token_bytes(TOKEN_BYTES)
        self._directory = directory
        self.name, self._fd = _create_locked(directory, PROBE_BYTES)
        os.pwrite(self._fd, PROBE_MAGIC + self.nonce, 0)

    def __enter__(self) -> ProbeSegment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd < 0:
            return
        (self._directory / self.name).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1


def read_probe(name: str, directory: Path = SHM_DIR) -> bytes:
    """The nonce of probe segment ``name`` (read, never mapped)."""
    if not _NAME.match(name):
        raise SharedMemoryError(f"{name!r} is not an embedding segment name")
    fd = _open_checked(directory / name, os.O_RDONLY)
    try:
        _check_allocated(name, os.fstat(fd), PROBE_BYTES)
        header = os.pread(fd, len(PROBE_MAGIC) + TOKEN_BYTES, 0)
    finally:
        os.close(fd)
    if not header.startswith(PROBE_MAGIC):
        raise SharedMemoryError(f"{name} is not a probe segment")
    return header[len(PROBE_MAGIC) :]


class _AttachedSegment:
    """A receiver's segment mapped by the writer. ``users`` counts the writes in progress;
    the mapping outlives its eviction from the cache until the last of them is done."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self.name = name
        fd = _open_checked(self.path, os.O_RDWR)
        try:
            self.layout, self.token = self._read_header(fd)
            status = os.fstat(fd)
            _check_allocated(name, status, self.layout.size)
            self._map = mmap.mmap(fd, self.layout.size)
        finally:
            os.close(fd)
        self.inode = status.st_ino
        self.users = 0
        self.retired = False

    def _read_header(self, fd: int) -> tuple[_Layout, bytes]:
        # pread, not the mapping: the file may be shorter than its header says.
        header = os.pread(fd, len(MAGIC) + TOKEN_BYTES + _WORD.size, 0)
        if len(header) < len(MAGIC) + TOKEN_BYTES + _WORD.size or not header.startswith(MAGIC):
            raise SharedMemoryError(f"{self.name} is not an embedding segment")
        token = header[len(MAGIC) : len(MAGIC) + TOKEN_BYTES]
        (data_bytes,) = _WORD.unpack_from(header, len(MAGIC) + TOKEN_BYTES)
        if data_bytes <= 0 or data_bytes % SLOT_BYTES:
            raise SharedMemoryError(f"{self.name} has a malformed header")
        return _Layout(data_bytes), token

    @property
    def data_bytes(self) -> int:
        return self.layout.data_bytes

    def is_current(self) -> bool:
        """Whether the name still leads to the file mapped here (not unlinked or replaced)."""
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == self.inode
        except FileNotFoundError:
            return False

    def write(self, offset: int, payload: torch.Tensor, generation: int) -> None:
        """Copy ``payload`` at data offset ``offset`` if the slots it covers still belong to
        ``generation``, holding them (a shared lock) for the whole copy."""
        count = payload.numel()
        if generation <= 0 or offset < 0 or offset + count > self.data_bytes:
            raise SharedMemoryError(f"write of {count} bytes at {offset} is outside the range")
        if count == 0:
            return
        # A descriptor of this write's own: OFD locks taken through a shared one would merge
        # with those of other threads' writes.
        fd = _open_checked(self.path, os.O_RDWR)
        try:
            status = os.fstat(fd)
            if status.st_ino != self.inode:
                raise SharedMemoryError(f"segment {self.name} was replaced")
            _check_allocated(self.name, status, self.layout.size)  # truncated since?
            start, length = self.layout.control(offset, count)
            if not _lock_range(fd, fcntl.F_RDLCK, start, length):
                raise StaleRange(f"the range at {offset} of {self.name} is being released")
            if self._map[start : start + length] != _words(generation, length):
                raise StaleRange(f"the range at {offset} of {self.name} has been released")
            target = torch.frombuffer(
                self._map, dtype=torch.uint8, count=count, offset=self.layout.data_offset + offset
            )
            codec.copy_bytes(target, payload)
        finally:
            os.close(fd)  # drops the lock

    def unmap(self) -> None:
        with contextlib.suppress(BufferError):  # a view still alive: freed with it
            self._map.close()


class SegmentWriter:
    """The writer's side: opens receivers' segments by name (kept mapped, a few at a time)
    and writes rows into the ranges their requests reserve. Safe to use from the event loop
    and worker threads at once."""

    def __init__(self, max_open: int = 16, directory: Path = SHM_DIR) -> None:
        self.max_open = max_open
        self.directory = directory
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _AttachedSegment] = OrderedDict()

    @contextlib.contextmanager
    def _borrowed(self, name: str) -> Iterator[_AttachedSegment]:
        """The mapped segment ``name``, kept mapped until the block ends even if it is
        evicted or unlinked meanwhile."""
        with self._lock:
            segment = self._lookup(name)
            segment.users += 1
        try:
            yield segment
        finally:
            with self._lock:
                segment.users -= 1
                if segment.retired and segment.users == 0:
                    segment.unmap()

    def _lookup(self, name: str) -> _AttachedSegment:
        """With the lock held: ``name`` mapped, from the cache or opened now."""
        if not _NAME.match(name):
            raise SharedMemoryError(f"{name!r} is not an embedding segment name")
        segment = self._open.get(name)
        if segment is not None:
            if segment.is_current():
                self._open.move_to_end(name)
                return segment
            self._retire(name)  # unlinked or replaced since it was opened
        self._drop_unlinked()
        segment = _AttachedSegment(self.directory, name)
        self._open[name] = segment
        while len(self._open) > self.max_open:
            self._retire(next(iter(self._open)))
        return segment

    def _retire(self, name: str) -> None:
        segment = self._open.pop(name)
        segment.retired = True
        if segment.users == 0:
            segment.unmap()

    def _drop_unlinked(self) -> None:
        """Unmap segments whose owner has unlinked them (it exited): the mapping alone would
        keep their memory allocated."""
        for name, segment in list(self._open.items()):
            if not segment.is_current():
                self._retire(name)

    @property
    def open_segments(self) -> list[str]:
        with self._lock:
            return list(self._open)

    def check(self, name: str, token: bytes, offset: int, capacity: int, generation: int) -> None:
        """Raise ``SharedMemoryError`` unless ``name`` is a usable segment on this host that
        holds ``token``, the range ``[offset, offset + capacity)`` lies inside it, and
        ``generation`` names a reservation (not 0)."""
        with self._borrowed(name) as segment:
            if not secrets.compare_digest(segment.token, token):
                raise SharedMemoryError(f"token mismatch for segment {name}")
            if offset < 0 or capacity < 0 or offset + capacity > segment.data_bytes:
                raise SharedMemoryError(f"range {offset}+{capacity} is outside segment {name}")
            if generation <= 0:
                raise SharedMemoryError("the request names no reservation generation")

    def write(self, name: str, offset: int, payload: torch.Tensor, generation: int) -> None:
        """Copy ``payload`` (a flat ``uint8`` tensor) into ``name`` at data offset ``offset``,
        if that range still belongs to the reservation ``generation`` (``StaleRange`` if
        not). Call ``check`` first."""
        with self._borrowed(name) as segment:
            segment.write(offset, payload, generation)

    def read_probe(self, name: str) -> bytes:
        """The nonce of the probe segment ``name`` (see ``ProbeSegment``)."""
        return read_probe(name, self.directory)

    def close(self) -> None:
        with self._lock:
            for name in list(self._open):
                self._retire(name)

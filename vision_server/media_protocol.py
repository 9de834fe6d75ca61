"""The byte layout between the vision service and its media workers: the tasks the server
sends, the shared-memory block a worker writes its tiles into, and the records it answers
with. The only code that knows that layout (``media_worker.py`` speaks it from the worker's
side, ``media_workers.py`` from the server's).

A worker decodes hostile files and may be compromised, so nothing it sends is trusted or
unpickled: its answers are fixed-size little-endian records (``struct``), read here into typed
messages (``MessageReader`` refuses anything malformed), then checked field by field against
what was asked by the pool; its tiles are raw uint8 pixels in a block of shared memory that the
server creates, sizes and seals (a worker cannot shrink it under the server's mapping). Tasks go
the other way as length-prefixed JSON: what the server tells a worker needs no protection from
the worker.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

PAGE = 4096

# ---- the shared-memory block -------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """One worker's block: a control page (byte 0: the server asks the worker to stop its
    task), then the encoded file of the current task, then its tiles, ``[n, 3, size, size]``
    uint8, tile after tile."""

    input_capacity: int  # bytes of the largest file a task may carry
    output_tiles: int  # tiles of the largest item (an image's grid + thumbnail, a video's frames)
    tile_size: int

    CANCEL_OFFSET = 0

    @property
    def input_offset(self) -> int:
        return PAGE

    @property
    def tile_bytes(self) -> int:
        return 3 * self.tile_size * self.tile_size

    @property
    def output_offset(self) -> int:
        return _round_up(self.input_offset + self.input_capacity, PAGE)

    @property
    def size(self) -> int:
        return _round_up(self.output_offset + self.output_tiles * self.tile_bytes, PAGE)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


# ---- tasks: server -> worker ------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTask:
    task_id: int
    input_bytes: int  # the file, at the block's input offset
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    tile_size: int
    # Cut the grid and the thumbnail on two threads and announce each as soon as it is cut.
    in_parts: bool


@dataclass(frozen=True)
class VideoTask:
    task_id: int
    input_bytes: int
    num_frames: int
    tile_size: int


Task = ImageTask | VideoTask
_TASK_LENGTH = struct.Struct("<I")
MAX_TASK_BYTES = 64 * 1024


def encode_task(task: Task) -> bytes:
    """A task as the worker reads it: a length, then JSON."""
    body = json.dumps({"kind": type(task).__name__, **asdict(task)}).encode()
    return _TASK_LENGTH.pack(len(body)) + body


def read_task(fd: int) -> Task | None:
    """The next task from ``fd`` (blocking), or None once the server has closed the pipe."""
    head = _read_exactly(fd, _TASK_LENGTH.size)
    if head is None:
        return None
    (length,) = _TASK_LENGTH.unpack(head)
    if length > MAX_TASK_BYTES:
        raise ValueError(f"task of {length} bytes")
    body = _read_exactly(fd, length)
    if body is None:
        return None
    fields: dict[str, Any] = json.loads(body)
    kind = fields.pop("kind")
    return ImageTask(**fields) if kind == "ImageTask" else VideoTask(**fields)


def _read_exactly(fd: int, count: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = os.read(fd, count - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


# ---- answers: worker -> server ----------------------------------------------------------------


class Kind(IntEnum):
    READY = 1
    PLAN = 2
    TILES = 3
    VIDEO = 4
    DONE = 5
    FAILED = 6
    CANCELLED = 7


DTYPE_UINT8 = 1
# Why a worker failed an item, for the server's message; at most this many bytes of UTF-8.
MAX_TEXT_BYTES = 1024
# magic, version, kind, code, task id, eight uint32 fields, two float64 fields.
_RECORD = struct.Struct("<4sBBHI8I2d")
_MAGIC = b"DVDw"
_VERSION = 1
NETWORK_ISOLATED = 1  # Ready.flags: the worker runs in a network namespace of its own
SHM_HIDDEN = 2  # Ready.flags: its /dev/shm is an empty tmpfs of its own (not the server's)


@dataclass(frozen=True)
class Ready:
    """The worker has started, shed what it does not need, and waits for tasks."""

    pid: int
    flags: int


@dataclass(frozen=True)
class Plan:
    """An image is decoded: its size (EXIF orientation applied) and the grid it is cut into."""

    task_id: int
    width: int
    height: int
    columns: int
    rows: int
    thumbnail: bool
    tile_size: int


@dataclass(frozen=True)
class Tiles:
    """Tiles ``first .. first + count - 1`` are in the block's output, ``[count, channels,
    height, width]`` of ``dtype``."""

    task_id: int
    first: int
    count: int
    dtype: int
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class VideoInfo:
    """A video's stream, as measured from its packets."""

    task_id: int
    width: int
    height: int
    total_frames: int
    duration_s: float
    fps: float


@dataclass(frozen=True)
class Done:
    task_id: int
    tiles: int


@dataclass(frozen=True)
class Failed:
    """The file was refused or could not be decoded; ``text`` says why."""

    task_id: int
    text: str


@dataclass(frozen=True)
class Cancelled:
    """The task stopped because the server asked."""

    task_id: int


Message = Ready | Plan | Tiles | VideoInfo | Done | Failed | Cancelled


def _record(
    kind: Kind,
    task_id: int = 0,
    ints: tuple[int, ...] = (),
    floats: tuple[float, ...] = (),
    code: int = 0,
) -> bytes:
    padded = (*ints, *(0,) * (8 - len(ints)))
    return _RECORD.pack(
        _MAGIC, _VERSION, kind, code, task_id, *padded, *floats, *(0.0,) * (2 - len(floats))
    )


def encode_message(message: Message) -> bytes:
    """One answer as the server reads it (``MessageReader``)."""
    match message:
        case Ready(pid, flags):
            return _record(Kind.READY, ints=(pid, flags))
        case Plan(task_id, width, height, columns, rows, thumbnail, tile_size):
            ints = (width, height, columns, rows, int(thumbnail), tile_size)
            return _record(Kind.PLAN, task_id, ints)
        case Tiles(task_id, first, count, dtype, channels, height, width):
            return _record(Kind.TILES, task_id, (first, count, channels, height, width), code=dtype)
        case VideoInfo(task_id, width, height, total_frames, duration_s, fps):
            return _record(Kind.VIDEO, task_id, (width, height, total_frames), (duration_s, fps))
        case Done(task_id, tiles):
            return _record(Kind.DONE, task_id, (tiles,))
        case Failed(task_id, text):
            raw = text.encode("utf-8", "replace")[:MAX_TEXT_BYTES]
            return _record(Kind.FAILED, task_id, (len(raw),)) + raw
        case Cancelled(task_id):
            return _record(Kind.CANCELLED, task_id)
    raise TypeError(f"not a message: {message!r}")


class ProtocolError(Exception):
    """Bytes from a worker that are not a well-formed record."""


class MessageReader:
    """Reads a worker's records from a byte stream, in whatever pieces they arrive. It holds
    at most one record and its text (a few KB) of a worker's bytes; anything malformed raises
    ``ProtocolError`` and the worker is not read again."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[Message]:
        self._buffer += chunk
        messages: list[Message] = []
        while len(self._buffer) >= _RECORD.size:
            magic, version, kind, code, task_id, *rest = _RECORD.unpack_from(self._buffer)
            if magic != _MAGIC or version != _VERSION:
                raise ProtocolError(f"bad record header {bytes(self._buffer[:6])!r}")
            ints, floats = rest[:8], rest[8:]
            text_bytes = ints[0] if kind == Kind.FAILED else 0
            if text_bytes > MAX_TEXT_BYTES:
                raise ProtocolError(f"{text_bytes} bytes of text")
            end = _RECORD.size + text_bytes
            if len(self._buffer) < end:
                break
            text = bytes(self._buffer[_RECORD.size : end]).decode("utf-8", "replace")
            del self._buffer[:end]
            messages.append(_message(kind, code, task_id, ints, floats, text))
        return messages


def _message(
    kind: int, code: int, task_id: int, ints: list[int], floats: list[float], text: str
) -> Message:
    if kind == Kind.READY:
        return Ready(ints[0], ints[1])
    if kind == Kind.PLAN:
        if ints[4] not in (0, 1):
            raise ProtocolError(f"thumbnail flag {ints[4]}")
        return Plan(task_id, ints[0], ints[1], ints[2], ints[3], bool(ints[4]), ints[5])
    if kind == Kind.TILES:
        return Tiles(task_id, ints[0], ints[1], code, ints[2], ints[3], ints[4])
    if kind == Kind.VIDEO:
        return VideoInfo(task_id, ints[0], ints[1], ints[2], floats[0], floats[1])
    if kind == Kind.DONE:
        return Done(task_id, ints[0])
    if kind == Kind.FAILED:
        return Failed(task_id, text)
    if kind == Kind.CANCELLED:
        return Cancelled(task_id)
    raise ProtocolError(f"unknown record kind {kind}")

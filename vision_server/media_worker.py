"""A media worker: one process of the vision service that decodes and tiles images and videos,
one at a time, and nothing else (``media_workers.py`` starts and supervises it).

Decoders parse hostile bytes, so they run here rather than in the server: a crash, a runaway
allocation or an endless loop costs this process and the one file it was given. The server
starts it as a fresh interpreter (``python -s -m vision_server.media_worker CONFIG``: what
multiprocessing's 'spawn' does, without its pickled bootstrap), with no file descriptors but
its two pipes and its shared-memory block, a minimal environment, ``/`` as its directory and a
session of its own. Before reading any input it also sheds, where the kernel allows:

- the network: a network namespace of its own (in a user namespace of its own, which needs
  no privilege), so it has no interface but a loopback of its own; best effort, reported to the
  server (``Ready.flags``);
- the server's shared memory: a mount namespace of its own, with an empty read-only tmpfs
  over ``/dev/shm`` (its own block comes as a file descriptor); best effort, reported too;
- privileges: ``no_new_privs`` (no set-uid binary can give it more);
- its life beyond the server's: ``PDEATHSIG``, so it dies with the thread that started it;
- core dumps (``RLIMIT_CORE`` 0), more than a few open files (``RLIMIT_NOFILE``), more than
  its memory (``RLIMIT_AS``, the whole address space) and, per item, more than its CPU time
  (``RLIMIT_CPU``: the kernel kills it with SIGXCPU).

Tiles are written straight into the block's output (``media_protocol.BlockLayout``) and
announced by fixed records on the result pipe; torch is never imported here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import resource
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from vision_server import media_protocol as wire

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REC, _MS_PRIVATE = 1 << 14, 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
# Open files once started: its pipes, its block, the standard streams, and a few to spare.
_MAX_OPEN_FILES = 32
# Address space a worker needs free under its limit once started, or it is refused at start.
_MIN_FREE_BYTES = 128 * 1024 * 1024


class _Stopped(Exception):  # noqa: N818 (an outcome, not an error)
    """The server asked this task to stop."""


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker is started with (JSON on its command line)."""

    parent_pid: int
    workers: int  # in the pool, this one included
    task_fd: int
    result_fd: int
    block_fd: int
    memory_bytes: int
    item_cpu_s: int
    layout: dict[str, int]  # media_protocol.BlockLayout's fields
    image_limits: dict[str, Any]  # preprocess.ImageLimits' fields
    video_limits: dict[str, Any]  # video.VideoLimits' fields


def _hide_shared_memory(libc: ctypes.CDLL) -> bool:
    """In a mount namespace of our own: an empty, read-only tmpfs over ``/dev/shm``, so the
    server's segments (every request's embeddings) are out of reach. Mounts made here are
    private first, so nothing propagates back to the host."""
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return False
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    return libc.mount(b"none", b"/dev/shm", b"tmpfs", flags, b"size=4k") == 0


def _shed_privileges(parent_pid: int) -> int:
    """Everything that must happen while this process has one thread (a new user namespace
    needs that), before numpy starts any; returns ``Ready.flags``."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = 0
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWNS) == 0:
        flags |= wire.NETWORK_ISOLATED
        if _hide_shared_memory(libc):
            flags |= wire.SHM_HIDDEN
    elif libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        flags |= wire.NETWORK_ISOLATED
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the server went away before PDEATHSIG was set
        os._exit(0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return flags


def _share_one_session_of_cpu(workers: int) -> None:
    """Each worker leads a session of its own, and Linux's autogroup scheduler shares the CPU
    between sessions before threads: the pool would weigh as much as ``workers`` services
    next to the vision service and a language service on the same host, where its decoding
    threads weighed as one. Lowering each worker's session weight (a nice of log1.25 of the
    pool size: CFS weights fall by 1.25 per step) makes the whole pool weigh about one session
    again. Best effort: without autogroups (cgroups share the CPU instead) there is no file."""
    nice = min(19, round(math.log(workers, 1.25))) if workers > 1 else 0
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as autogroup:
        autogroup.write(str(nice))


class _Worker:
    def __init__(self, config: WorkerConfig) -> None:
        import numpy as np

        from vision_server.preprocess import ImageLimits
        from vision_server.video import VideoLimits

        self.config = config
        self.layout = wire.BlockLayout(**config.layout)
        self.image_limits = ImageLimits(
            **{
                **config.image_limits,
                "allowed_formats": frozenset(config.image_limits["allowed_formats"]),
            }
        )
        self.video_limits = VideoLimits(**config.video_limits)
        self.block = mmap.mmap(config.block_fd, self.layout.size)
        layout = self.layout
        self.input = np.frombuffer(self.block, np.uint8, layout.input_capacity, layout.input_offset)
        size = layout.tile_size
        self.output = np.frombuffer(
            self.block, np.uint8, layout.output_tiles * layout.tile_bytes, layout.output_offset
        ).reshape(layout.output_tiles, 3, size, size)
        self._send_lock = threading.Lock()

    def send(self, *messages: wire.Message) -> None:
        """Records in one write: the server wakes up once for them (and a write of a few
        hundred bytes to a pipe is atomic)."""
        records = b"".join(wire.encode_message(message) for message in messages)
        with self._send_lock:  # the two threads of an image cut in parts
            os.write(self.config.result_fd, records)

    def stop_requested(self) -> bool:
        return self.block[wire.BlockLayout.CANCEL_OFFSET] != 0

    def _check_stop(self) -> None:
        if self.stop_requested():
            raise _Stopped

    def serve(self) -> None:
        while (task := wire.read_task(self.config.task_fd)) is not None:
            self._limit_cpu()
            self.run(task)

    def _limit_cpu(self) -> None:
        """This item may use ``item_cpu_s`` more seconds of CPU; then SIGXCPU ends us."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = int(usage.ru_utime + usage.ru_stime) + 1
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (used + self.config.item_cpu_s, hard))

    def run(self, task: wire.Task) -> None:
        from vision_server.errors import MEMORY_LIMIT_REASON, InvalidRequest
        from vision_server.video import DecodeCancelled

        what = "image" if isinstance(task, wire.ImageTask) else "video"
        try:
            if task.input_bytes > self.layout.input_capacity:
                raise ValueError(f"task of {task.input_bytes} bytes")
            data = self.input[: task.input_bytes].tobytes()
            if isinstance(task, wire.ImageTask):
                self._image(task, data)
            else:
                self._video(task, data)
        except (_Stopped, DecodeCancelled):
            self.send(wire.Cancelled(task.task_id))
        except InvalidRequest as exc:
            self.send(wire.Failed(task.task_id, str(exc)))
        except MemoryError:
            self.send(wire.Failed(task.task_id, f"cannot decode {what}: {MEMORY_LIMIT_REASON}"))
        except Exception as exc:  # a decoder's own error, whatever its type: the file's fault
            self.send(
                wire.Failed(task.task_id, f"cannot decode {what}: {type(exc).__name__}: {exc}")
            )

    def _image(self, task: wire.ImageTask, data: bytes) -> None:
        from protos.tiling import TilingOptions
        from vision_server.preprocess import (
            decode_image,
            plan_image,
            write_grid,
            write_thumbnail,
            write_tiles,
        )

        options = TilingOptions(task.min_tiles, task.max_tiles, task.use_thumbnail, task.tile_size)
        image = decode_image(data, self.image_limits)
        self._check_stop()
        planned = plan_image(image, options)
        del image
        grid = planned.grid
        if grid.num_tiles > self.layout.output_tiles:
            raise ValueError(f"{grid.num_tiles} tiles do not fit the block")
        plan = wire.Plan(
            task.task_id,
            planned.rgb.width,
            planned.rgb.height,
            grid.columns,
            grid.rows,
            grid.thumbnail,
            grid.tile_size,
        )
        out = self.output[: grid.num_tiles]
        done = wire.Done(task.task_id, grid.num_tiles)
        if not (task.in_parts and grid.thumbnail):
            write_tiles(out, planned)
            self.send(plan, self._tiles(task.task_id, 0, grid.num_tiles), done)
            return
        # In parts: the plan now, then the grid and the thumbnail, cut on two threads (Pillow
        # releases the GIL while resizing), each announced as soon as it is cut, so that the
        # server encodes the grid while the thumbnail is still being resized.
        self.send(plan)
        self._check_stop()
        failure: list[BaseException] = []

        def thumbnail() -> None:
            try:
                write_thumbnail(out[grid.grid_tiles], planned)
                self.send(self._tiles(task.task_id, grid.grid_tiles, 1))
            except BaseException as exc:  # re-raised on the main thread
                failure.append(exc)

        cutter = threading.Thread(target=thumbnail, name="thumbnail")
        cutter.start()
        try:
            write_grid(out, planned)
            self.send(self._tiles(task.task_id, 0, grid.grid_tiles))
        finally:
            cutter.join()
        if failure:
            raise failure[0]
        self.send(done)

    def _tiles(self, task_id: int, first: int, count: int) -> wire.Tiles:
        size = self.layout.tile_size
        return wire.Tiles(task_id, first, count, wire.DTYPE_UINT8, 3, size, size)

    def _video(self, task: wire.VideoTask, data: bytes) -> None:
        from vision_server.video import sample_video

        if task.num_frames > self.layout.output_tiles or task.tile_size != self.layout.tile_size:
            raise ValueError(f"{task.num_frames} frames of {task.tile_size} do not fit the block")
        out = self.output[: task.num_frames]
        info, _ = sample_video(data, task.num_frames, self.video_limits, out, self.stop_requested)
        self.send(
            wire.VideoInfo(
                task.task_id, info.width, info.height, info.total_frames, info.duration_s, info.fps
            ),
            self._tiles(task.task_id, 0, task.num_frames),
            wire.Done(task.task_id, task.num_frames),
        )


def _limit_resources(config: WorkerConfig) -> None:
    """Once every library is loaded: the address space and the open files."""
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    if used + _MIN_FREE_BYTES > config.memory_bytes:
        sys.stderr.write(
            f"media worker: {used >> 20} MiB of address space are used at start; the memory "
            f"limit of {config.memory_bytes >> 20} MiB leaves no room to decode\n"
        )
        sys.exit(2)
    resource.setrlimit(resource.RLIMIT_AS, (config.memory_bytes, config.memory_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (_MAX_OPEN_FILES, _MAX_OPEN_FILES))


def main(argv: list[str] | None = None) -> None:
    config = WorkerConfig(**json.loads((sys.argv[1:] if argv is None else argv)[0]))
    flags = _shed_privileges(config.parent_pid)
    _share_one_session_of_cpu(config.workers)
    # The server, not the terminal, decides when a worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = _Worker(config)
    import av  # noqa: F401 (loaded at start-up, not on a request: FFmpeg's libraries)

    _limit_resources(config)
    worker.send(wire.Ready(os.getpid(), flags))
    worker.serve()


if __name__ == "__main__":
    main()

"""Read-only volume mounts for the local pods of tests/deploy/test_kubernetes.py.

A pod can mount a volume read-only while another pod writes the same volume (the vision pods
read the model cache the language pods fill). Locally both are processes sharing one folder,
and file permissions cannot make it read-only for one of them (nor at all for root). Python's
audit hooks can: in a process started with this folder on ``PYTHONPATH``, every open for
writing, and every creation, removal, rename or change of a file, under a folder that
``TEST_READ_ONLY_MOUNTS`` names (``os.pathsep``-separated) fails with EROFS, as on a read-only
mount, and is reported on stderr. Code that writes without Python's file functions (a C
library) is not seen; the vision service's writes to a cache all start with Python's.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

_MOUNTS = tuple(
    os.path.abspath(folder)
    for folder in os.environ.get("TEST_READ_ONLY_MOUNTS", "").split(os.pathsep)
    if folder
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Audit events that change the file system, and which of their arguments are paths.
_CHANGES = {
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.symlink": (1,),
    "os.link": (1,),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "os.mkfifo": (0,),
    "os.mknod": (0,),
}


def _inside(path: Any) -> str | None:
    if isinstance(path, int) or path is None:
        return None  # a file descriptor: opened (and checked) before
    absolute = os.path.abspath(os.fsdecode(path))
    for mount in _MOUNTS:
        if absolute == mount or absolute.startswith(mount + os.sep):
            return absolute
    return None


def _refuse(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        path, flags = args[0], args[2]
        writes = isinstance(flags, int) and flags & _WRITE_FLAGS
        paths = [path] if writes else []
    else:
        paths = [args[i] for i in _CHANGES.get(event, ()) if i < len(args)]
    for path in paths:
        inside = _inside(path)
        if inside is not None:
            print(f"read-only mount: refused {event} {inside}", file=sys.stderr, flush=True)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), inside)


if _MOUNTS:
    sys.addaudithook(_refuse)

"""The port file: where a service that bound port 0 says which port it got.

A service started with ``--port-file PATH`` writes one JSON object there once it serves
(``{"host", "port", "pid"}``, and for the vision service ``"metrics_port"``), through a rename,
so that a reader sees the whole file or none; it removes the file at a clean exit. A supervisor
(``dvd-serve``, a test, a script) starts the service with ``--port 0`` and reads the file,
instead of choosing a free port itself and racing every other process for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_port_file(path: Path, ports: dict[str, Any]) -> None:
    """Write ``ports`` to ``path`` as one JSON object, all at once (through a rename)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(ports) + "\n")
    partial.replace(path)


def read_port_file(path: Path, pid: int) -> dict[str, Any] | None:
    """What process ``pid`` wrote to ``path``, or None while it has not (a file left by an
    earlier process, with another pid, is not its)."""
    try:
        ports: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return ports if ports.get("pid") == pid else None

"""`dvd-serve` (and `make serve`): run the vision service and the language service together.

Both run as their own processes, exactly as in a two-node deployment, connected over gRPC on
this host. Ctrl-C (or SIGTERM) stops both; if either dies, the other is stopped too.
Settings not listed here reach both services through their ``DVD_*`` environment variables;
vLLM's engine arguments (``--kv-cache-dtype``, ``-tp``, ... as ``dvd-llm-server`` takes them)
are checked here and passed on to the language service's command line.
Each service reports the ports it bound through its own port file (see ``port_file``), so
either port may be 0; with ``--vision-port 0`` the language service starts once the vision
service has bound its port, since its ``--vision-target`` names it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import Field

from checkpoints.settings import CheckpointSettings
from llm_server.engine.engine_args import split_serve_command_line
from llm_server.port_file import read_port_file, write_port_file


class ServeSettings(CheckpointSettings):
    """Run the DvD vision and language services together on this host. Every flag is also a
    ``DVD_*`` environment variable (flags win)."""

    host: str = Field("127.0.0.1", description="address both services listen on")
    port: int = Field(
        8000, ge=0, le=65535, description="HTTP port of the OpenAI-compatible API (0: a free one)"
    )
    vision_port: int = Field(
        50051, ge=0, le=65535, description="gRPC port of the vision service (0: a free one)"
    )
    port_file: str | None = Field(
        None,
        description="once both services serve, write their ports to this file as one JSON "
        'object ({"host", "port", "vision_port", "vision_metrics_port", "pid"}; '
        "vision_metrics_port null without metrics), removed at exit",
    )
    enforce_eager: bool | None = Field(
        None, description="vLLM eager mode (default: on when there is no GPU, for a fast start)"
    )


def _model_args(settings: ServeSettings) -> list[str]:
    model = ["--model", settings.model] if settings.model else []
    if settings.revision:
        model += ["--revision", settings.revision]
    return model


def _vision_command(settings: ServeSettings, port_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "vision_server.server",
        "--host", settings.host, "--port", str(settings.vision_port),
        "--port-file", str(port_file), *_model_args(settings),
    ]  # fmt: skip


def _llm_command(
    settings: ServeSettings, vision_port: int, port_file: Path, engine_args: Sequence[str] = ()
) -> list[str]:
    eager = settings.enforce_eager
    if eager is None:
        import torch

        eager = not torch.cuda.is_available()
    return [
        sys.executable, "-m", "llm_server.server",
        "--host", settings.host, "--port", str(settings.port),
        "--vision-target", f"{settings.host}:{vision_port}", "--port-file", str(port_file),
        *_model_args(settings), *(["--enforce-eager"] if eager else []), *engine_args,
    ]  # fmt: skip


def _stop(processes: list[subprocess.Popen[bytes]], timeout: float = 40.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _announce(
    settings: ServeSettings, port: int, vision_port: int, vision_metrics_port: int | None
) -> None:
    """Say where both services serve, on stdout and in --port-file."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    metrics = "" if vision_metrics_port is None else f", metrics on :{vision_metrics_port}"
    print(
        f"dvd-serve: serving the OpenAI API on http://{host}:{port}/v1 "
        f"(vision service on {host}:{vision_port}, gRPC{metrics})",
        flush=True,
    )
    if settings.port_file:
        ports = {
            "host": settings.host,
            "port": port,
            "vision_port": vision_port,
            "vision_metrics_port": vision_metrics_port,
            "pid": os.getpid(),
        }
        write_port_file(Path(settings.port_file), ports)


def main(argv: list[str] | None = None) -> None:
    own_args, engine_args = split_serve_command_line(
        sys.argv[1:] if argv is None else argv, ServeSettings
    )
    settings = ServeSettings(  # type: ignore[call-arg]
        _cli_parse_args=own_args, _cli_prog_name="dvd-serve"
    )
    reports = Path(tempfile.mkdtemp(prefix="dvd-serve-"))  # the services' port files
    vision_file, llm_file = reports / "vision.json", reports / "llm.json"
    processes = [subprocess.Popen(_vision_command(settings, vision_file))]
    stopping = False

    def request_stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print("dvd-serve: starting the vision and language services; Ctrl-C stops both", flush=True)
    vision_ports: dict[str, Any] | None = None
    llm_ports: dict[str, Any] | None = None
    announced = False
    exit_code = 0
    try:
        while not stopping:
            names = ("vision service", "language service")  # the second may not be started
            for name, process in zip(names, processes, strict=False):
                code = process.poll()
                if code is not None:
                    print(f"dvd-serve: the {name} exited with {code}", flush=True)
                    exit_code = code or 1
                    stopping = True
            if stopping:
                break
            if vision_ports is None:
                vision_ports = read_port_file(vision_file, processes[0].pid)
            if len(processes) == 1 and (settings.vision_port or vision_ports is not None):
                # The language service names the vision service's port: with --vision-port 0,
                # it starts once the vision service has bound one.
                vision_port = vision_ports["port"] if vision_ports else settings.vision_port
                processes.append(
                    subprocess.Popen(_llm_command(settings, vision_port, llm_file, engine_args))
                )
            if len(processes) == 2 and llm_ports is None:
                llm_ports = read_port_file(llm_file, processes[1].pid)
            if not announced and vision_ports is not None and llm_ports is not None:
                _announce(
                    settings,
                    llm_ports["port"],
                    vision_ports["port"],
                    vision_ports.get("metrics_port"),
                )
                announced = True
            time.sleep(0.2)
    finally:
        _stop(processes)
        shutil.rmtree(reports, ignore_errors=True)
        if settings.port_file:
            Path(settings.port_file).unlink(missing_ok=True)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()

"""`dvd-serve` (and `make serve`): run the vision service and the language service together.

Both run as their own processes, exactly as in a two-node deployment, connected over gRPC on
this host. Ctrl-C (or SIGTERM) stops both; if either dies, the other is stopped too.
Settings not listed here reach both services through their ``DVD_*`` environment variables.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType

from pydantic import Field

from checkpoints.settings import CheckpointSettings


class ServeSettings(CheckpointSettings):
    """Run the DvD vision and language services together on this host. Every flag is also a
    ``DVD_*`` environment variable (flags win)."""

    host: str = Field("127.0.0.1", description="address both services listen on")
    port: int = Field(8000, description="HTTP port of the OpenAI-compatible API")
    vision_port: int = Field(50051, description="gRPC port of the vision service")
    enforce_eager: bool | None = Field(
        None, description="vLLM eager mode (default: on when there is no GPU, for a fast start)"
    )


def _commands(settings: ServeSettings) -> tuple[list[str], list[str]]:
    model = ["--model", settings.model] if settings.model else []
    if settings.revision:
        model += ["--revision", settings.revision]
    vision = [
        sys.executable, "-m", "vision_server.server",
        "--host", settings.host, "--port", str(settings.vision_port), *model,
    ]  # fmt: skip
    eager = settings.enforce_eager
    if eager is None:
        import torch

        eager = not torch.cuda.is_available()
    llm = [
        sys.executable, "-m", "llm_server.server",
        "--host", settings.host, "--port", str(settings.port),
        "--vision-target", f"{settings.host}:{settings.vision_port}",
        *model, *(["--enforce-eager"] if eager else []),
    ]  # fmt: skip
    return vision, llm


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


def main(argv: list[str] | None = None) -> None:
    settings = ServeSettings(  # type: ignore[call-arg]
        _cli_parse_args=sys.argv[1:] if argv is None else argv,
        _cli_prog_name="dvd-serve",
    )
    vision_cmd, llm_cmd = _commands(settings)
    processes = [subprocess.Popen(vision_cmd), subprocess.Popen(llm_cmd)]
    stopping = False

    def request_stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print(
        f"dvd-serve: vision service on {settings.host}:{settings.vision_port} (gRPC), "
        f"OpenAI API on http://{settings.host}:{settings.port}/v1 once the engine is up; "
        "Ctrl-C stops both",
        flush=True,
    )
    exit_code = 0
    while not stopping:
        for name, process in zip(("vision service", "language service"), processes, strict=True):
            code = process.poll()
            if code is not None:
                print(f"dvd-serve: the {name} exited with {code}", flush=True)
                exit_code = code or 1
                stopping = True
        time.sleep(0.2)
    _stop(processes)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()

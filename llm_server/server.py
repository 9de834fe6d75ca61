"""`dvd-llm-server`: the OpenAI-compatible HTTP API on vLLM, fed by the vision service."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from llm_server import tracing
from llm_server.app import create_app
from llm_server.engine.engine_args import parse_llm_command_line
from llm_server.http_server import uvicorn_config
from llm_server.port_file import write_port_file
from llm_server.settings import LLMSettings


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the HTTP port before the engine starts: vLLM opens many ephemeral ports while
    starting, and one of them must not take ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


logger = logging.getLogger("llm_server")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine. Names other than ``localhost``
    are not resolved: what they resolve to can change after the check."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unauthenticated_exposure(settings: LLMSettings) -> str | None:
    """Why the settings would expose /v1 without a key to other machines, or None."""
    has_key = settings.api_key is not None and settings.api_key.get_secret_value() != ""
    if has_key or settings.allow_unauthenticated or is_loopback(settings.host):
        return None
    return (
        f"refusing to serve /v1 on {settings.host} without an API key: anyone who reaches this "
        "address could use the model. Set --api-key (DVD_API_KEY), listen on 127.0.0.1, or "
        "pass --allow-unauthenticated if something in front of this service authenticates"
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, except that a SIGTERM/SIGINT that led to a graceful drain ends the process with
    status 0 (uvicorn re-raises the signal after shutting down, which exits with 128 + 15), and
    that it says where it listens once it serves (a log line, and ``--port-file``)."""

    def __init__(self, config: uvicorn.Config, settings: LLMSettings, port: int) -> None:
        super().__init__(config)
        self.settings = settings
        self.port = port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the engine is up (lifespan), the socket listens
        host = self.settings.host
        shown = f"[{host}]" if ":" in host else host
        logger.info("language service listening on http://%s:%d", shown, self.port)
        if self.settings.port_file:
            write_port_file(
                Path(self.settings.port_file), {"host": host, "port": self.port, "pid": os.getpid()}
            )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def main(argv: list[str] | None = None) -> None:
    # DvD's flags, and vLLM's engine arguments (vLLM's own parser; see engine_args).
    settings, engine_args = parse_llm_command_line(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    tracing.configure()  # from the standard OTEL_* variables; off unless they ask
    # Before the port is bound and the model loaded: a configuration error, reported at once.
    refusal = unauthenticated_exposure(settings)
    if refusal is not None:
        logger.error(refusal)
        sys.exit(2)
    port_file = Path(settings.port_file) if settings.port_file else None
    if port_file is not None:
        port_file.unlink(missing_ok=True)  # an earlier start's port is not ours
    sock = bind_socket(settings.host, settings.port)
    port = int(sock.getsockname()[1])  # the one bound, when --port is 0
    failures: list[str] = []

    def stop_on_failure(reason: str) -> None:
        failures.append(reason)
        server.should_exit = True  # the same graceful stop as SIGTERM

    app = create_app(settings, on_fatal=stop_on_failure, engine_args=engine_args)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, settings, port)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        if port_file is not None:
            port_file.unlink(missing_ok=True)
    if failures:
        # Non-zero, so that compose or Kubernetes restarts the service.
        logger.error("exiting with status 1: %s", failures[0])
        sys.exit(1)


if __name__ == "__main__":
    main()

"""`dvd-llm-server`: the OpenAI-compatible HTTP API on vLLM, fed by the vision service."""

from __future__ import annotations

import logging
import sys

import uvicorn

from llm_server.app import create_app
from llm_server.settings import LLMSettings

# In-flight requests get this long to finish after SIGTERM before the server stops.
GRACEFUL_SHUTDOWN_S = 30


def main(argv: list[str] | None = None) -> None:
    settings = LLMSettings(  # type: ignore[call-arg]
        _cli_parse_args=sys.argv[1:] if argv is None else argv,
        _cli_prog_name="dvd-llm-server",
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


if __name__ == "__main__":
    main()

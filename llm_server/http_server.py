"""uvicorn, configured to bound its own work: how many connections it serves, how large a
request's headers may be, and how long a client may take to send them.

- Connections: at ``settings.connection_limit`` open connections or requests in progress,
  uvicorn answers new requests with a 503 at once (its ``limit_concurrency``) instead of
  letting a queue grow; admission (429) happens below that, in the app.
- Header size: h11 parses requests (not httptools, which has no limit) and refuses a request
  line and headers over ``max_header_bytes`` with a 400, closing the connection.
- Header deadline: uvicorn has none (its keep-alive timer only runs between requests), so a
  client could hold a connection forever by sending its headers a byte at a time, or nothing.
  ``HeaderDeadlineProtocol`` closes a connection whose request line and headers have not all
  arrived ``header_read_timeout_s`` after it opened, or after the first byte of its next
  request; a 408 is sent first when part of a request had come.
- Body deadline: ``BodyLimitMiddleware`` (``request_read_timeout_s``, then a 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llm_server.settings import LLMSettings

_LATE_HEADERS = b"request headers not received in time"
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n\r\n%s" % (len(_LATE_HEADERS), _LATE_HEADERS)
)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's line and headers."""

    header_timeout_s = 10.0  # set per server by ``protocol_with_header_deadline``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._partial_request = False
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            # Headers of a request are arriving: the first request's deadline runs from the
            # connection's opening, a kept-alive connection's next request's from its first byte.
            self._partial_request = True
            if self._header_deadline is None:
                self._arm_header_deadline()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the request failed)
            self._disarm_header_deadline()
            self._partial_request = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._partial_request:
            # Written by hand: h11 sends no response before it has a request to answer.
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def protocol_with_header_deadline(timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for one server's header deadline."""
    return type(
        "HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s}
    )


def uvicorn_config(app: Any, settings: LLMSettings, **overrides: Any) -> uvicorn.Config:
    """The language service's uvicorn configuration, with the HTTP layer's bounds from
    ``settings`` (``overrides``: other uvicorn options, e.g. ``lifespan`` in tests)."""
    options: dict[str, Any] = {
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": int(settings.shutdown_grace_s),
        "http": protocol_with_header_deadline(settings.header_read_timeout_s),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.connection_limit,
    }
    return uvicorn.Config(app, **{**options, **overrides})

"""Pure ASGI middleware (streaming responses and disconnect detection pass through untouched):
response counting by route and status, the request body's size limit and read deadline, and
an early look at admission before a chat request's body is read; the size of the headers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_server import metrics, tracing
from llm_server.api.admission import Admission
from llm_server.errors import APIError, HeadersTooLarge, RequestTimeout, RequestTooLarge


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            metrics.http_requests.labels(route=path, status=str(status["code"])).inc()


# A refused body is still read and thrown away, within these caps, before the refusal (413,
# 429, 431) is sent: clients that send the whole body before reading the answer (Python's
# urllib, httpx, requests) would otherwise meet a connection reset instead of the refusal.
DRAIN_MAX_BYTES = 256 * 1024 * 1024
DRAIN_MAX_SECONDS = 10.0


async def drain_body(receive: Receive, max_bytes: int, max_seconds: float) -> bool:
    """Read and discard the rest of a request body; True when all of it arrived within the
    caps (the connection can then stay open)."""
    drained = 0
    try:
        async with asyncio.timeout(max_seconds):
            while drained <= max_bytes:
                message = await receive()
                if message["type"] != "http.request":  # the client left
                    return False
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        pass
    return False


async def refuse(scope: Scope, receive: Receive, send: Send, error: APIError, unread: bool) -> None:
    """Answer ``error`` to a request whose body is ``unread`` (all or part of it): the body is
    drained first, within caps, so that clients that send it all before reading get the
    answer; a connection whose body could not be drained is closed after it."""
    headers = dict(scope.get("headers", []))
    declared = headers.get(b"content-length", b"")
    drained = False
    if unread and headers.get(b"expect", b"").lower() != b"100-continue":
        # A client waiting for "100 Continue" sends nothing more; the others are sending.
        too_long = declared.isdigit() and int(declared) > DRAIN_MAX_BYTES
        if not too_long:
            drained = await drain_body(receive, DRAIN_MAX_BYTES, DRAIN_MAX_SECONDS)
    extra = {} if drained or not unread else {"Connection": "close"}
    response = JSONResponse(
        error.body(), status_code=error.status_code, headers={**error.headers(), **extra}
    )
    await response(scope, receive, send)


class _BodyTooLarge(Exception):
    def __init__(self, unread: bool) -> None:
        super().__init__()
        self.unread = unread  # more of the body is on its way


def json_items(data: bytes) -> int:
    """Commas, objects, arrays and escapes in ``data``: every JSON value but the first of its
    array or object follows a comma, containers cost the most to build, and an escape costs
    a string about twice a plain character (64 MiB of ``\\n`` took ``json.loads`` 0.23 s,
    of plain text 0.12 s). Base64 (images, videos) has none of them."""
    return data.count(b",") + data.count(b"{") + data.count(b"[") + data.count(b"\\")


async def read_body(receive: Receive, max_bytes: int) -> tuple[bytes, int] | None:
    """The whole request body and its ``json_items``, counted chunk by chunk as it arrives
    (64 MiB counted at once held the event loop 75 ms); None when the client left while
    sending it; ``_BodyTooLarge`` as soon as it passes ``max_bytes``."""
    chunks: list[bytes] = []
    size = items = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left while sending
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        more = bool(message.get("more_body", False))
        if size > max_bytes:
            raise _BodyTooLarge(unread=more)
        chunks.append(chunk)
        items += json_items(chunk)
        if not more:
            return b"".join(chunks), items


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413, before reading them when
    ``Content-Length`` says so, else as soon as they pass the limit; bodies that have not
    all arrived ``read_timeout_s`` after the headers with a 408 (a client that sends one byte
    a second holds a connection that long, no longer); and bodies with more than
    ``max_json_items`` JSON items with a 413, before they are parsed (parsing holds the
    event loop, and a body of tiny values costs many times one of long strings). The app
    receives the body in one message, once it has all arrived within the limits."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, read_timeout_s: float, max_json_items: int
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.max_json_items = max_json_items

    def _too_large(self) -> RequestTooLarge:
        return RequestTooLarge(
            f"request body exceeds {self.max_bytes} bytes; send smaller or fewer images"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await refuse(scope, receive, send, self._too_large(), unread=True)
            return
        try:
            async with asyncio.timeout(self.read_timeout_s):
                received = await read_body(receive, self.max_bytes)
        except _BodyTooLarge as exc:
            await refuse(scope, receive, send, self._too_large(), unread=exc.unread)
            return
        except TimeoutError:
            late = RequestTimeout(
                f"the request body did not arrive within {self.read_timeout_s:g} s"
            )
            # Not drained: the client is the slow party. The connection closes after this.
            response = JSONResponse(
                late.body(), status_code=late.status_code, headers={"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        if received is None:
            return
        body, items = received
        if items > self.max_json_items:
            crowded = RequestTooLarge(
                f"the request body holds {items} JSON items (commas, objects, arrays and "
                f"escapes); the limit is {self.max_json_items}"
            )
            await refuse(scope, receive, send, crowded, unread=False)
            return
        replayed = False

        async def replay_then_receive() -> Message:
            nonlocal body, replayed
            if replayed:  # after the body: disconnect detection
                return await receive()
            message: Message = {"type": "http.request", "body": body, "more_body": False}
            body, replayed = b"", True
            return message

        await self.app(scope, replay_then_receive, send)


class AdmissionGateMiddleware:
    """A 429 for a chat request that arrives while every admission slot is taken, before its
    body is read or parsed: under overload, refusing costs no JSON parsing. The slot itself is
    still taken in the route (this is an early look, and a request that passes it may still
    find the slots gone by then)."""

    def __init__(
        self, app: ASGIApp, admission: Callable[[], Admission | None], paths: frozenset[str]
    ) -> None:
        self.app = app
        self.admission = admission  # None until the chat service has started
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            admission = self.admission()
            if admission is not None and admission.full:
                await refuse(scope, receive, send, admission.refusal(), unread=True)
                return
        await self.app(scope, receive, send)


class HeaderLimitMiddleware:
    """A 431 for a request whose line and headers together exceed ``max_bytes``. The HTTP
    parser (h11) bounds what it buffers while headers arrive; headers that arrive whole, in
    one read, are counted here, before anything else looks at the request."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
            size += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))
            if size > self.max_bytes:
                error = HeadersTooLarge(
                    f"the request line and headers exceed {self.max_bytes} bytes"
                )
                await refuse(scope, receive, send, error, unread=True)
                return
        await self.app(scope, receive, send)


class ServerTimingMiddleware:
    """Outermost: each HTTP request gets its stage timings (``tracing.begin_request``), and
    its response a ``Server-Timing`` header with the stages that ended before the headers
    went out (all of them for a whole response; admission, media and vision for a stream).
    With tracing on, the request is the ``http.request`` span, under an incoming W3C
    ``traceparent`` when there is one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timings = tracing.begin_request()
        status = {"code": 500}
        request_id: list[bytes] = []

        async def add_server_timing(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                request_id.extend(v for k, v in message.get("headers", []) if k == b"x-request-id")
                if timings.durations:
                    headers = list(message.get("headers", []))
                    headers.append((b"server-timing", timings.header().encode("latin-1")))
                    message = {**message, "headers": headers}
            await send(message)

        tracer = tracing.tracer()
        if tracer is None:
            await self.app(scope, receive, add_server_timing)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", [])
        }
        attributes = {"http.request.method": scope["method"], "url.path": scope["path"]}
        with tracer.start_as_current_span(
            "http.request",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=timings.started_epoch_ns,  # where the "body" stage starts too
        ) as span:
            try:
                await self.app(scope, receive, add_server_timing)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status["code"])
                if request_id:
                    span.set_attribute("dvd.request_id", request_id[0].decode("latin-1"))
                if status["code"] >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {status['code']}"))

"""Pure ASGI middleware (streaming responses and disconnect detection pass through untouched):
response counting by route and status, and the request body size limit."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_server import metrics
from llm_server.errors import RequestTooLarge


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


# A refused body is still read and thrown away, within these caps, before the 413 is sent:
# clients that send the whole body before reading the answer (Python's urllib, httpx,
# requests) would otherwise meet a connection reset instead of the 413.
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


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413, before reading them when
    ``Content-Length`` says so, else as soon as they pass the limit. The app receives the
    body in one message, once it has all arrived within the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, unread: bool) -> None:
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length", b"")
        drained = False
        if unread and headers.get(b"expect", b"").lower() != b"100-continue":
            # A client waiting for "100 Continue" sends nothing more; the others are sending.
            too_long = declared.isdigit() and int(declared) > DRAIN_MAX_BYTES
            if not too_long:
                drained = await drain_body(receive, DRAIN_MAX_BYTES, DRAIN_MAX_SECONDS)
        error = RequestTooLarge(
            f"request body exceeds {self.max_bytes} bytes; send smaller or fewer images"
        )
        response = JSONResponse(
            error.body(),
            status_code=error.status_code,
            headers=None if drained or not unread else {"Connection": "close"},
        )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, unread=True)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, unread=more)
                return
            chunks.append(chunk)
            if not more:
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay_then_receive() -> Message:
            nonlocal body, replayed
            if replayed:  # after the body: disconnect detection
                return await receive()
            message: Message = {"type": "http.request", "body": body, "more_body": False}
            body, replayed = b"", True
            return message

        await self.app(scope, replay_then_receive, send)

"""The HTTP layer bounds its own work, over raw sockets on 127.0.0.1: the language service's
real ASGI app behind uvicorn configured as ``dvd-llm-server`` configures it
(``llm_server.http_server.uvicorn_config``), in a thread of this process, with tight limits.
No engine runs (the app's lifespan is off): these bounds all act before a request reaches one.

- a body sent a byte at a time is cut off at ``--request-read-timeout-s`` with a 408;
- headers sent a byte at a time, or nothing at all, at ``--header-read-timeout-s``;
- headers over ``--max-header-bytes`` get a 431 (a 400 from the parser when they come in
  pieces, and the connection is closed);
- a body of more than ``--max-json-items`` JSON items gets a 413 before it is parsed;
- past ``--max-connections``, requests get a 503 at once rather than a queue;
- with every admission slot taken, a chat request gets its 429 without its body being parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn

from llm_server.api.admission import Admission
from llm_server.api.middleware import json_items, read_body
from llm_server.app import create_app
from llm_server.http_server import uvicorn_config
from llm_server.server import bind_socket
from llm_server.settings import LLMSettings

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5


def limits(**overrides: Any) -> LLMSettings:
    fields: dict[str, Any] = {
        "header_read_timeout_s": HEADER_TIMEOUT_S,
        "request_read_timeout_s": BODY_TIMEOUT_S,
        "max_header_bytes": 4096,
        "max_concurrent_requests": 1,
        "max_connections": 4,
        "log_level": "warning",
        **overrides,
    }
    return LLMSettings(**fields)  # type: ignore[call-arg]


@contextlib.contextmanager
def served(settings: LLMSettings, admission: Admission | None = None) -> Iterator[int]:
    """The app on a free port of 127.0.0.1 for the ``with`` block; yields the port. With
    ``admission``, a stand-in chat service holds it (the admission gate looks at it)."""
    app = create_app(settings)
    app.state.chat = SimpleNamespace(admission=admission) if admission is not None else None
    server = uvicorn.Server(uvicorn_config(app, settings, lifespan="off"))
    sock = bind_socket("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection. A byte a trickling test
    sent after the server closed is answered with a reset, which ends the reading too (Linux
    still delivers what arrived before it)."""
    sock.settimeout(timeout_s)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One whole response (it has a Content-Length) on a connection that stays open; its
    status line and headers."""
    sock.settimeout(10)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    declared = re.search(rb"content-length: (\d+)", head.lower())
    assert declared is not None, head
    while len(body) < int(declared.group(1)):
        body += sock.recv(65536)
    return head


def exchange(port: int, request: bytes) -> bytes:
    """One request on a fresh connection that asks to be closed after it; the raw reply."""
    with connect(port) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


def get(path: str, headers: bytes = b"") -> bytes:
    return (
        b"GET "
        + path.encode()
        + b" HTTP/1.1\r\nHost: t\r\n"
        + headers
        + b"Connection: close\r\n\r\n"
    )


def post_chat(body: bytes, declared: int | None = None) -> bytes:
    length = len(body) if declared is None else declared
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (length, body)
    )


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def trickle(sock: socket.socket, data: bytes, interval_s: float, until_s: float) -> float:
    """Send ``data`` a byte per ``interval_s`` for up to ``until_s`` (the server may close
    the connection first); the seconds spent."""
    started = time.monotonic()
    for byte in data:
        if time.monotonic() - started > until_s:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # the server closed the connection
            break
        time.sleep(interval_s)
    return time.monotonic() - started


def test_a_body_sent_a_byte_at_a_time_gets_a_408_at_the_deadline():
    with served(limits()) as port, connect(port) as sock:
        sock.sendall(post_chat(b"", declared=200))
        started = time.monotonic()
        sender = threading.Thread(target=trickle, args=(sock, b"x" * 200, 0.25, 8))
        sender.start()
        reply = read_until_closed(sock)
        elapsed = time.monotonic() - started
        sender.join()
    assert status(reply) == 408, reply
    assert b'"code":"request_timeout"' in reply
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 3, elapsed


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline():
    with served(limits()) as port, connect(port) as sock:
        started = time.monotonic()
        headers = b"GET /metrics HTTP/1.1\r\nHost: t\r\n" + b"X-Slow: " + b"y" * 100
        sender = threading.Thread(target=trickle, args=(sock, headers, 0.1, 8))
        sender.start()
        reply = read_until_closed(sock)
        elapsed = time.monotonic() - started
        sender.join()
    assert status(reply) == 408, reply
    assert HEADER_TIMEOUT_S <= elapsed < HEADER_TIMEOUT_S + 3, elapsed


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline():
    with served(limits()) as port, connect(port) as sock:
        started = time.monotonic()
        reply = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert reply == b""
    assert HEADER_TIMEOUT_S <= elapsed < HEADER_TIMEOUT_S + 3, elapsed


def test_the_next_request_on_a_kept_alive_connection_has_its_own_deadline():
    """After a first request is answered, a second one trickled in is cut off too (uvicorn's
    keep-alive timer stops at its first byte)."""
    with served(limits()) as port, connect(port) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status(read_response(sock)) == 200
        started = time.monotonic()
        sender = threading.Thread(
            target=trickle, args=(sock, b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"z" * 100, 0.1, 8)
        )
        sender.start()
        reply = read_until_closed(sock)
        elapsed = time.monotonic() - started
        sender.join()
    assert status(reply) == 408, reply
    assert HEADER_TIMEOUT_S <= elapsed < HEADER_TIMEOUT_S + 3, elapsed


def test_oversized_headers_are_refused_and_the_connection_closed():
    """Headers over the limit: a 431 when they arrive whole (the app counts them), a 400 from
    the parser when they arrive in pieces (h11 stops buffering past the limit)."""
    fill = b"X-Fill: " + b"a" * 8000 + b"\r\n"
    with served(limits()) as port:
        assert status(exchange(port, get("/metrics", b"X-Fill: " + b"a" * 3000 + b"\r\n"))) == 200
        whole = exchange(port, get("/metrics", fill))
        assert status(whole) == 431, whole
        assert b'"code":"headers_too_large"' in whole
        with connect(port) as sock:
            # 5000 bytes of unfinished headers, then nothing: the parser refuses them once
            # they pass 4096, having read all that was sent (so the close is clean).
            request = get("/metrics", fill)[:5000]
            for start in range(0, len(request), 1000):
                sock.sendall(request[start : start + 1000])
                time.sleep(0.05)
            in_pieces = read_until_closed(sock)
        assert status(in_pieces) == 400, in_pieces


def test_past_the_connection_limit_requests_get_a_503_at_once():
    settings = limits(header_read_timeout_s=30.0)  # the idle connections must stay open
    with served(settings) as port:
        idle = [connect(port) for _ in range(settings.connection_limit)]
        try:
            # A connection counts once the server's loop has accepted it; until all of them
            # have been, a request may still be served. A queued request would not be answered
            # before the idle ones' 30 s header timeout: exchange's 10 s read timeout fails it.
            deadline = time.monotonic() + 30
            while status(refused := exchange(port, get("/metrics"))) == 200:
                assert time.monotonic() < deadline, "the idle connections were never counted"
                time.sleep(0.02)
            assert status(refused) == 503, refused
        finally:
            for sock in idle:
                sock.close()
        # Closed connections leave the count once the loop has seen them close.
        deadline = time.monotonic() + 30
        while status(reply := exchange(port, get("/metrics"))) != 200:
            assert time.monotonic() < deadline, reply
            time.sleep(0.02)


def test_a_body_of_many_tiny_json_values_is_refused_before_parsing():
    """64 MiB of ``{}`` took json.loads 2.7 s on the event loop; the count comes first."""
    crowded = b'{"model": "m", "messages": [], "junk": [' + b",".join([b"{}"] * 200) + b"]}"
    with served(limits(max_json_items=300)) as port:
        refused = exchange(port, post_chat(crowded))
        assert status(refused) == 413, refused
        assert b"JSON items" in refused
        within = exchange(port, post_chat(crowded.replace(b"{},", b"0 ", 120)))
        assert status(within) != 413, within


def test_a_body_of_escapes_is_refused_before_parsing():
    """An escape costs a string about twice a plain character: escapes count as items."""
    text = b"\\n" * 200
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + text + b'"}]}'
    with served(limits(max_json_items=150)) as port:
        refused = exchange(port, post_chat(body))
        assert status(refused) == 413, refused
        assert b"escapes" in refused
        within = exchange(port, post_chat(body.replace(b"\\n", b"nn", 100)))
        assert status(within) != 413, within


def test_the_body_is_counted_chunk_by_chunk_as_it_arrives():
    body = b'{"a": [1, 2, {"b": "\\n\\t"}], "c": "' + b"x" * 1000 + b'"}'
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]

    async def receive() -> dict:
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    received = asyncio.run(read_body(receive, max_bytes=len(body)))
    assert json_items(body) == 8  # 3 commas, 2 objects, 1 array, 2 escapes
    assert received == (body, 8)


def test_a_full_server_refuses_before_parsing_the_body():
    """Malformed JSON gets a 429, not the 400 that parsing it would give: the admission gate
    answered first. With a slot free, the same body reaches the parser."""
    admission = Admission(1)
    with served(limits(), admission) as port:
        admission.in_flight = 1  # every slot taken
        refused = exchange(port, post_chat(b'{"model": "m", "messages": ['))
        assert status(refused) == 429, refused
        assert b"retry-after: 1" in refused.lower() and b'"code":"overloaded"' in refused
        admission.in_flight = 0
        parsed = exchange(port, post_chat(b'{"model": "m", "messages": ['))
        assert status(parsed) == 400, parsed
        assert b"JSON" in parsed


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_connections": 1, "max_concurrent_requests": 1}, "must be above"),
        ({"max_messages": 10**6}, "max_messages"),
    ],
)
def test_settings_that_cannot_hold_are_refused_at_start(fields, message):
    with pytest.raises(ValueError, match=message):
        LLMSettings(**fields)  # type: ignore[call-arg]

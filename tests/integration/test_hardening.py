"""Hostile input, hostile URLs, faults, overload, auth and shutdown, with real processes.

One "hardened" deployment (tight limits, an API key, an image allow-list) serves this module;
its last test shuts it down with SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import http.server
import io
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import (
    REPO_ROOT,
    Stack,
    data_url,
    encode_image,
    gradient_image,
    noise_image,
    process_fixture,
    restart_vision_server,
    start_stacks,
)
from PIL import Image

pytestmark = pytest.mark.slow

API_KEY = "test-key-1234"
# The vision service's own per-image tile limit (the language service's default is 40).
VISION_ARGS = ["--max-tiles-per-request=30", "--max-image-pixels=4000000", "--max-tiles-limit=12"]
BODY_TIMEOUT_S = 3
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "dvd-tiny-internvl"


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png = encode_image(noise_image(120, 90, seed=1))
    hits: dict[str, int] = {}
    # /held.png: the request is seen (``held_seen``), the image is sent once ``held_release``.
    held_seen = threading.Event()
    held_release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802
        host = self.server.server_address[0]
        self.hits[host] = self.hits.get(host, 0) + 1
        port = self.server.server_address[1]
        if self.path == "/image.png":
            self._send(200, self.png, "image/png")
        elif self.path == "/held.png":
            self.held_seen.set()
            self.held_release.wait(60)
            self._send(200, self.png, "image/png")
        elif self.path == "/huge.png":
            self._send(200, b"\x89PNG" + b"0" * 3_000_000, "image/png")
        elif self.path == "/to-internal":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{port}/image.png")
            self.end_headers()
        elif self.path == "/to-image":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.end_headers()
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, mime: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _same_port_on_both(addresses: tuple[str, str]) -> list[socketserver.ThreadingTCPServer]:
    """Image servers on both addresses, on one port: the first binds a free one, the second
    binds the same there, or both start over on another (it may be taken on that address)."""
    for _ in range(50):
        first = socketserver.ThreadingTCPServer((addresses[0], 0), _ImageHandler)
        try:
            port = first.server_address[1]
            second = socketserver.ThreadingTCPServer((addresses[1], port), _ImageHandler)
        except OSError as error:
            first.server_close()
            if error.errno != errno.EADDRINUSE:
                raise
            continue
        return [first, second]
    raise RuntimeError(f"no port free on both {addresses} in 50 tries")


@pytest.fixture(scope="module")
def image_servers() -> Iterator[int]:
    """The same tiny image server on 127.0.0.1 and 127.0.0.2 (one port); yields the port."""
    servers = _same_port_on_both(("127.0.0.1", "127.0.0.2"))
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers[0].server_address[1]
    for server in servers:
        server.shutdown()
        server.server_close()


@process_fixture(scope="module")
def hardened(tiny_models, log_dir) -> Iterator[Stack]:
    running = start_stacks(
        {"hardened": tiny_models["hf"]},
        log_dir,
        llm_args=[
            f"--api-key={API_KEY}",
            "--max-request-bytes=2000000",
            "--max-concurrent-requests=4",
            "--max-images-per-request=4",
            "--max-image-bytes=1000000",
            "--max-tokens-limit=64",
            "--default-max-tokens=8",
            "--allowed-image-hosts=localhost,127.0.0.2,169.254.169.254",
            "--allowed-image-networks=127.0.0.1/32",
            "--vision-timeout-s=30",
            "--shutdown-grace-s=20",
            "--max-messages=64",
            f"--request-read-timeout-s={BODY_TIMEOUT_S}",
        ],
        vision_args=VISION_ARGS,
    )
    stack = running["hardened"]
    try:
        yield stack
    finally:
        stack.stop()


def post(
    stack: Stack, body: dict | bytes, headers: dict[str, str] | None = None, timeout: float = 60
) -> httpx.Response:
    url = f"{stack.base_url}/v1/chat/completions"
    merged = {**AUTH, **(headers or {})}
    if isinstance(body, bytes):
        return httpx.post(
            url,
            content=body,
            headers={**merged, "Content-Type": "application/json"},
            timeout=timeout,
        )
    return httpx.post(url, json=body, headers=merged, timeout=timeout)


def image_message(*urls: str, text: str = "What is this?") -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def chat_body(messages: list[dict], **extra: object) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **extra}


def png_url(width: int, height: int, seed: int = 0) -> str:
    return data_url(noise_image(width, height, seed))


def gradient_url(width: int, height: int, seed: int = 0) -> str:
    """Large in pixels, small in bytes."""
    return data_url(gradient_image(width, height, seed))


def _bomb() -> str:
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, "PNG")  # 36 Mpixels, a few KB compressed
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ico() -> str:
    buffer = io.BytesIO()
    noise_image(32, 32, 0).save(buffer, "ICO")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD_INPUT = [
    # (name, body, expected status, message fragment)
    ("malformed JSON", b'{"model": "x", "messages": [', 400, "JSON"),
    ("no messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("unknown role", chat_body([{"role": "wizard", "content": "hi"}]), 400, "role"),
    (
        "unknown part type",
        chat_body([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]),
        400,
        "type",
    ),
    (
        "temperature out of range",
        chat_body([{"role": "user", "content": "hi"}], temperature=-1),
        400,
        "temperature",
    ),
    ("top_p zero", chat_body([{"role": "user", "content": "hi"}], top_p=0), 400, "top_p"),
    (
        "max_tokens over the limit",
        chat_body([{"role": "user", "content": "hi"}], max_tokens=65),
        400,
        "limit of 64",
    ),
    (
        "too many stops",
        chat_body([{"role": "user", "content": "hi"}], stop=["a"] * 17),
        400,
        "stop",
    ),
    ("n too large", chat_body([{"role": "user", "content": "hi"}], n=9), 400, "n=9"),
    (
        "too many messages",
        chat_body([{"role": "user", "content": "hi"}] * 65),
        400,
        "65 messages",
    ),
    (
        "a stop sequence too long",
        chat_body([{"role": "user", "content": "hi"}], stop="s" * 300),
        400,
        "300 characters",
    ),
    (
        "prompt longer than the context",
        chat_body([{"role": "user", "content": "word " * 20000}]),
        400,
        "maximum context length",
    ),
    (
        "too many images",
        chat_body(image_message(*[png_url(8, 8, i) for i in range(5)])),
        400,
        "5 images",
    ),
    (
        "too many tiles",
        chat_body(image_message(*[gradient_url(1800, 1500, i) for i in range(3)])),
        400,
        "39 tiles",
    ),
    ("decompression bomb", chat_body(image_message(_bomb())), 400, "pixels"),
    ("image over the byte limit", chat_body(image_message(png_url(700, 600, 3))), 400, "limit"),
    ("refused image format", chat_body(image_message(_ico())), 400, "format ICO"),
    (
        "not an image",
        chat_body(image_message("data:image/png;base64," + base64.b64encode(b"hello").decode())),
        400,
        "cannot decode",
    ),
    ("text data URL", chat_body(image_message("data:text/plain;base64,aGk=")), 400, "image/*"),
    ("file URL", chat_body(image_message("file:///etc/passwd")), 400, "scheme"),
    (
        "body over the limit",
        chat_body([{"role": "user", "content": "x" * 2_100_000}]),
        413,
        "exceeds",
    ),
    (
        "unsupported feature",
        chat_body([{"role": "user", "content": "hi"}], audio={"voice": "alloy"}),
        400,
        "audio is not supported",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "fragment"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_gets_a_clear_4xx(hardened, name, body, status, fragment):
    reply = post(hardened, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"], error
    assert error["type"]
    health = httpx.get(f"{hardened.base_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["vision"] == "serving"


def test_api_key(hardened):
    body = chat_body([{"role": "user", "content": "hi"}])
    missing = httpx.post(f"{hardened.base_url}/v1/chat/completions", json=body, timeout=30)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = post(hardened, body, headers={"Authorization": "Bearer wrong-key-1234"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{hardened.base_url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{hardened.base_url}/v1/models", headers=AUTH, timeout=10).status_code == 200
    assert post(hardened, body).status_code == 200
    assert httpx.get(f"{hardened.base_url}/health", timeout=10).status_code == 200  # stays open


def test_default_max_tokens_applies(hardened):
    reply = post(
        hardened, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "min_tokens": 8}
    )
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == 8


def test_max_tiles_is_bounded_by_the_vision_services_limit_before_any_fetch(
    hardened, image_servers
):
    """The vision service reports its limit (12 here) in ModelInfo; a request over it is
    refused by the language service, its image never fetched."""
    # An image request first: the language service has asked the vision service what it serves.
    assert post(hardened, chat_body(image_message(png_url(64, 64)))).status_code == 200
    _ImageHandler.hits.clear()
    url = f"http://localhost:{image_servers}/image.png"
    reply = post(hardened, chat_body(image_message(url), max_tiles=13))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "max_tiles" and "limit of 12 tiles per image" in error["message"]
    assert _ImageHandler.hits == {}
    assert post(hardened, chat_body(image_message(url), max_tiles=12)).status_code == 200


def test_a_body_sent_a_byte_a_second_is_cut_off(hardened):
    host, port = hardened.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        started = time.monotonic()
        received = b""
        sock.settimeout(1.0)
        while time.monotonic() - started < BODY_TIMEOUT_S + 10 and b"\r\n\r\n" not in received:
            try:
                received += sock.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")  # one byte a second
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408"), received
    assert BODY_TIMEOUT_S - 0.5 <= elapsed < BODY_TIMEOUT_S + 3, elapsed


# ---- remote images (SSRF) ---------------------------------------------------------------


def test_remote_images(hardened, image_servers):
    port = image_servers
    _ImageHandler.hits.clear()
    cases = [
        (f"http://localhost:{port}/image.png", 200, None),  # allow-listed host, allowed network
        (f"http://localhost:{port}/to-image", 200, None),  # redirect within the allowed network
        (f"http://127.0.0.2:{port}/image.png", 400, "private or internal address"),  # loopback
        (f"http://localhost:{port}/to-internal", 400, "private or internal address"),  # redirect
        (
            "http://169.254.169.254/latest/meta-data/",
            400,
            "private or internal address",
        ),  # metadata
        (f"http://127.0.0.1:{port}/image.png", 400, "not on the allow-list"),
        ("http://example.invalid/cat.png", 400, "not on the allow-list"),
        (f"http://localhost:{port}/huge.png", 400, "limit"),
        (f"http://localhost:{port}/missing.png", 400, "HTTP 404"),
        (f"ftp://localhost:{port}/image.png", 400, "scheme"),
    ]
    for url, status, fragment in cases:
        reply = post(hardened, chat_body(image_message(url)))
        assert reply.status_code == status, (url, reply.text)
        if fragment:
            assert fragment in reply.json()["error"]["message"], (url, reply.text)
    # Nothing ever connected to the address that is not allowed.
    assert _ImageHandler.hits.get("127.0.0.2", 0) == 0
    assert _ImageHandler.hits.get("127.0.0.1", 0) >= 3


# ---- faults -----------------------------------------------------------------------------


def unread_bytes(port: int) -> int:
    """Bytes that arrived on connections to local ``port`` and that the process there has not
    read: the receive queues that the kernel reports in /proc/net/tcp and tcp6 (a dual-stack
    listener's IPv4 connections are there)."""
    total = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if local.endswith(f":{port:04X}") and state == "01":  # ESTABLISHED
                total += int(queues.split(":")[1], 16)
    return total


def test_vision_killed_mid_request_fails_fast_then_recovers(hardened, tiny_models, log_dir):
    assert hardened.vision is not None
    vision_args = VISION_ARGS

    def restart(name: str, extra: list[str]) -> None:
        # On the same address (the language service names it), once the old one released it.
        assert hardened.vision is not None
        hardened.vision = restart_vision_server(
            hardened.vision,
            name,
            tiny_models["hf"],
            hardened.vision_target,
            log_dir,
            [*vision_args, *extra],
        )

    result: dict[str, object] = {}
    image = encode_image(noise_image(48, 48, seed=1))  # fits any HTTP/2 window: sent whole
    vision_port = int(hardened.vision_target.rsplit(":", 1)[1])

    def send() -> None:
        body = chat_body(image_message("data:image/png;base64," + base64.b64encode(image).decode()))
        result["reply"] = post(hardened, body, timeout=60)

    # Connected, its model checked: the next image request goes straight to Encode.
    assert post(hardened, chat_body(image_message(png_url(64, 64)))).status_code == 200
    # A stopped vision service accepts the call and never answers: the request is in it when
    # it is killed (an idle service would have encoded it at once). In it means its bytes
    # wait, unread, in the stopped process's socket.
    hardened.vision.signal(signal.SIGSTOP)
    unread_before = unread_bytes(vision_port)
    sender = threading.Thread(target=send)
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while unread_bytes(vision_port) < unread_before + len(image):
            assert time.monotonic() < deadline, "the Encode call never reached the vision service"
            assert sender.is_alive(), result
            time.sleep(0.02)
        assert sender.is_alive()  # the request waits on the vision service...
    finally:
        hardened.vision.signal(signal.SIGKILL)  # ...which dies with the call unread
    sender.join(60)
    reply = result["reply"]
    assert isinstance(reply, httpx.Response)
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "vision_unavailable"
    # Failed because the service went away, not by the 30 s vision deadline (which says "did
    # not answer in time").
    assert "vision service is unavailable" in error["message"], error

    down = post(hardened, chat_body(image_message(png_url(64, 64))))
    assert down.status_code == 503 and down.headers.get("Retry-After")
    assert (
        post(hardened, chat_body([{"role": "user", "content": "text still works"}])).status_code
        == 200
    )

    # Back, on the same address: the language service reconnects by itself.
    restart("hardened-vision-again", [])
    deadline = time.monotonic() + 30
    while (reply := post(hardened, chat_body(image_message(png_url(64, 64))))).status_code != 200:
        assert time.monotonic() < deadline, reply.text
        time.sleep(0.3)


def test_overload_returns_429_and_the_server_stays_healthy(hardened):
    body = chat_body(
        [{"role": "user", "content": "Tell me a long story."}], max_tokens=64, min_tokens=64
    )

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            url = f"{hardened.base_url}/v1/chat/completions"
            return list(await asyncio.gather(*(client.post(url, json=body) for _ in range(12))))

    replies = asyncio.run(burst())
    codes = sorted(r.status_code for r in replies)
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 4 and codes.count(429) >= 1, codes
    rejected = next(r for r in replies if r.status_code == 429)
    assert rejected.headers["Retry-After"] and rejected.json()["error"]["code"] == "overloaded"
    assert httpx.get(f"{hardened.base_url}/health", timeout=10).status_code == 200
    assert post(hardened, chat_body([{"role": "user", "content": "after"}])).status_code == 200


def test_two_hundred_concurrent_image_requests(stacks):
    """Every request completes or gets a clear error; none is lost; the server stays healthy."""
    base_url = stacks["hf"].base_url
    images = [png_url(96 + i % 7, 64 + i % 5, i) for i in range(200)]

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            url = f"{base_url}/v1/chat/completions"

            async def one(image: str) -> int:
                try:
                    reply = await client.post(
                        url, json=chat_body(image_message(image), max_tokens=4)
                    )
                except httpx.HTTPError as exc:
                    pytest.fail(f"request lost: {exc!r}")
                if reply.status_code != 200:
                    assert reply.json()["error"]["message"]
                return reply.status_code

            return list(await asyncio.gather(*(one(image) for image in images)))

    codes = asyncio.run(load())
    assert len(codes) == 200
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) == 200  # the defaults admit this load without refusing any
    assert httpx.get(f"{base_url}/health", timeout=10).json() == {
        "status": "ok",
        "engine": "serving",
        "vision": "serving",
    }


# ---- property-based fuzzing of the OpenAPI schema ----------------------------------------


def test_schemathesis_finds_no_server_errors(hardened, tmp_path):
    """Schemathesis generates requests from /openapi.json; no response may be a 5xx. The
    separate pytest run draws as this session's hypothesis profile says (tests/conftest.py):
    the same examples every time, unless ``--hypothesis-profile=explore``."""
    from hypothesis import settings as hypothesis_settings

    derandomize = hypothesis_settings().derandomize
    script = tmp_path / "fuzz_api.py"
    script.write_text(
        "import schemathesis\n"
        "from hypothesis import HealthCheck, settings\n"
        "from schemathesis.checks import not_a_server_error\n"
        f"schema = schemathesis.openapi.from_url('{hardened.base_url}/openapi.json')\n"
        "@schema.parametrize()\n"
        "@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),\n"
        f"          derandomize={derandomize}, database=None, print_blob=True)\n"
        "def test_api(case):\n"
        f"    case.call_and_validate(headers={AUTH!r}, checks=[not_a_server_error], timeout=60)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert httpx.get(f"{hardened.base_url}/health", timeout=10).status_code == 200


# ---- code hygiene --------------------------------------------------------------------------


def test_nothing_is_unpickled():
    """No module imports a pickle-based loader and nothing calls torch.load (checked on the
    syntax tree, so comments that say so do not count)."""
    import ast

    unpicklers = {
        "pickle",
        "cPickle",
        "_pickle",
        "dill",
        "cloudpickle",
        "joblib",
        "marshal",
        "shelve",
    }
    offenders = []
    for package in ("vision_server", "llm_server", "protos", "clients"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module.split(".")[0]]
                if unpicklers.intersection(names):
                    offenders.append(f"{path.name}:{node.lineno} imports {names}")
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                ):
                    offenders.append(f"{path.name}:{node.lineno} calls torch.load")
    assert offenders == []


# ---- shutdown (last: it stops the module's deployment) -----------------------------------


def test_sigterm_drains_in_flight_requests_then_exits(hardened, image_servers):
    """A request in flight at SIGTERM (its image held by the test's image server) is served
    to its end, while new connections are already refused."""
    held_url = f"http://localhost:{image_servers}/held.png"
    content = [
        {"type": "text", "text": "stream please"},
        {"type": "image_url", "image_url": {"url": held_url}},
    ]
    body = {
        **chat_body([{"role": "user", "content": content}], max_tokens=64, min_tokens=64),
        "stream": True,
    }
    events: list[str] = []
    _ImageHandler.held_seen.clear()
    _ImageHandler.held_release.clear()

    def stream() -> None:
        with httpx.stream(
            "POST", f"{hardened.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
        ) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line)

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert _ImageHandler.held_seen.wait(60), "the request never fetched its image"
        hardened.llm.proc.send_signal(signal.SIGTERM)  # as `docker stop` does: the main process
        # No new connections while draining: refused while the request still waits for its image.
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{hardened.base_url}/health", timeout=2)
            except httpx.HTTPError:
                break
            assert time.monotonic() < deadline, "new connections still accepted after SIGTERM"
            time.sleep(0.02)
    finally:
        _ImageHandler.held_release.set()
    reader.join(60)
    assert events and events[-1] == "data: [DONE]"  # the in-flight request finished...
    assert any('"finish_reason":"length"' in event for event in events)  # ...all 64 tokens
    assert hardened.llm.proc.wait(60) == 0  # then the process exited cleanly
    assert "Exception ignored" not in Path(hardened.llm.log_path).read_text()  # no finaliser noise

    assert hardened.vision is not None
    hardened.vision.proc.send_signal(signal.SIGTERM)
    assert hardened.vision.proc.wait(30) == 0
    assert "vision service stopped" in Path(hardened.vision.log_path).read_text()

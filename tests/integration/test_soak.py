"""A long mixed soak of one deployment, then the death of its language engine.

The soak (about four minutes of load by default; ``DVD_SOAK_S`` changes it) mixes text and
images, plain and streamed answers, n>1, clients that hang up mid-stream and bad input, and
kills and restarts the vision service half-way. Between phases the load pauses, so the
services are measured idle: open file descriptors (but the gRPC connection between the two
services, which the vision service renews every 30 s, and which is bounded on its own) and
threads must not grow, resident memory not by more than 10% after warm-up, and no slot may be
left held. The last test kills vLLM's engine core process under load: requests must fail
with 503, /health must say so, and the server must exit non-zero.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers import (
    Stack,
    data_url,
    noise_image,
    process_fixture,
    restart_vision_server,
    scrape_metric,
    start_stacks,
)
from PIL import Image

pytestmark = pytest.mark.slow

MODEL = "dvd-tiny-internvl"
SOAK_S = float(os.environ.get("DVD_SOAK_S", "240"))
WORKERS = 6
MAX_REQUEST_BYTES = 4_000_000
VISION_ARGS = ["--max-batch-tiles=8", "--max-image-pixels=20000000"]


@process_fixture(scope="module")
def soaked(tiny_models, log_dir) -> Iterator[Stack]:
    running = start_stacks(
        {"soak": tiny_models["hf"]},
        log_dir,
        llm_args=[
            "--max-concurrent-requests=32",
            f"--max-request-bytes={MAX_REQUEST_BYTES}",
            "--vision-timeout-s=30",
            "--shutdown-grace-s=5",
        ],
        vision_args=VISION_ARGS,
    )
    stack = running["soak"]
    try:
        yield stack
    finally:
        stack.stop()


# ---- the load -------------------------------------------------------------------------------


def _bomb() -> str:
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, "PNG")  # 36 Mpixels in a few KB
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGES = [data_url(noise_image(64 + 37 * i, 48 + 29 * i, seed=i)) for i in range(6)]
BOMB = _bomb()


def _user(*urls: str, text: str = "Describe it.") -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _body(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": 12, **extra}


TEXT = [{"role": "user", "content": "Tell me something."}]

# Bad input: (name, body or raw bytes, expected status).
BAD_INPUT: list[tuple[str, dict[str, Any] | bytes, int]] = [
    ("malformed JSON", b'{"model": "x", "messages": [', 400),
    ("unknown role", _body([{"role": "wizard", "content": "hi"}]), 400),
    ("unknown model", {**_body(TEXT), "model": "other"}, 404),
    ("n too large", _body(TEXT, n=99), 400),
    ("longer than the context", _body(TEXT, max_tokens=100_000), 400),
    (
        "not an image",
        _body(_user("data:image/png;base64," + base64.b64encode(b"hi").decode())),
        400,
    ),
    ("text data URL", _body(_user("data:text/plain;base64,aGk=")), 400),
    ("decompression bomb", _body(_user(BOMB)), 400),
    ("router on a non-Flash model", _body(_user(IMAGES[0]), vir="max"), 400),
    ("body over the limit", _body([{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]), 413),
]


@dataclass
class Outcome:
    kind: str
    status: int
    started: float
    ended: float
    error_code: str | None = None
    expected: int = 200


@dataclass
class Ledger:
    outcomes: list[Outcome] = field(default_factory=list)
    bad_inputs: set[str] = field(default_factory=set)

    def count(self, kind: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.kind == kind)


async def _one(client: httpx.AsyncClient, url: str, rng: random.Random, ledger: Ledger) -> None:
    """One request drawn from the mix; its outcome goes to the ledger."""
    roll = rng.random()
    started = time.monotonic()
    expected, code = 200, None
    if roll < 0.2:
        kind, body, stream = "text", _body(TEXT), False
    elif roll < 0.45:
        count = rng.choice([1, 1, 2])
        kind, body, stream = "image", _body(_user(*rng.sample(IMAGES, count))), False
    elif roll < 0.6:
        kind, body, stream = "stream", _body(_user(rng.choice(IMAGES)), stream=True), True
    elif roll < 0.7:
        kind, stream = "n>1", rng.random() < 0.5
        body = _body(_user(rng.choice(IMAGES)), n=rng.choice([2, 3]), temperature=0.8)
        body["stream"] = stream
    elif roll < 0.8:
        kind = "disconnect"
        body = _body(TEXT, stream=True, max_tokens=200, min_tokens=200)
        async with client.stream("POST", url, json=body) as reply:
            lines = reply.aiter_lines()
            for _ in range(3):  # the role chunk, a blank line, the first tokens
                await anext(lines)
            status = reply.status_code
        ledger.outcomes.append(Outcome(kind, status, started, time.monotonic()))
        return
    else:
        name, bad, expected = rng.choice(BAD_INPUT)
        ledger.bad_inputs.add(name)
        if isinstance(bad, bytes):
            reply = await client.post(
                url, content=bad, headers={"Content-Type": "application/json"}
            )
        else:
            reply = await client.post(url, json=bad)
        if reply.status_code >= 400:
            code = reply.json()["error"]["code"]
        ledger.outcomes.append(
            Outcome("bad input", reply.status_code, started, time.monotonic(), code, expected)
        )
        return
    if stream:
        async with client.stream("POST", url, json=body) as reply:
            status = reply.status_code
            if status != 200:  # refused before the stream started
                await reply.aread()
                code = reply.json()["error"]["code"]
            events = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
        if status == 200:
            assert events[-1] == "data: [DONE]", events[-3:]
            errors = [json.loads(e[6:]) for e in events[:-1] if '"error"' in e]
            if errors:  # a stream that failed midway says so in an event
                status, code = 503, errors[0]["error"]["code"]
    else:
        reply = await client.post(url, json=body)
        status = reply.status_code
        if status != 200:
            code = reply.json()["error"]["code"]
        else:
            assert len(reply.json()["choices"]) == body.get("n", 1)
    ledger.outcomes.append(Outcome(kind, status, started, time.monotonic(), code, expected))


def run_load(stack: Stack, seconds: float, seed: int, ledger: Ledger) -> None:
    """``WORKERS`` clients sending the mix back to back for ``seconds``, then idle."""
    url = f"{stack.base_url}/v1/chat/completions"

    async def worker(index: int, until: float) -> None:
        rng = random.Random(seed * 100 + index)
        async with httpx.AsyncClient(timeout=120) as client:
            while time.monotonic() < until:
                await _one(client, url, rng, ledger)

    async def everyone() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(worker(i, until) for i in range(WORKERS)))

    asyncio.run(everyone())


def burst(stack: Stack, ledger: Ledger) -> None:
    """24 image requests at once, first thing in a warm-up: the services' thread pools grow
    on demand to their size, so that growth measured after warm-up is not theirs."""
    url = f"{stack.base_url}/v1/chat/completions"

    async def at_once() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            started = time.monotonic()
            replies = await asyncio.gather(
                *(client.post(url, json=_body(_user(IMAGES[i % 6]))) for i in range(24))
            )
        for reply in replies:
            ledger.outcomes.append(Outcome("burst", reply.status_code, started, time.monotonic()))

    asyncio.run(at_once())


# ---- what is measured -----------------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    rss: int
    fds: int  # every open file descriptor
    grpc_connections: int  # established TCP connections between the two services
    threads: int
    thread_names: dict[str, int]
    fd_kinds: dict[str, int] = field(default_factory=dict)  # what the fds are, for messages

    @property
    def fds_but_grpc_connections(self) -> int:
        """The fds that must not grow. The vision service ends each gRPC connection after
        --max-connection-age-ms (30 s) and the language service opens a new one at its next
        call or health check: both processes hold one such socket or none, depending on when
        they are sampled. Those connections are bounded separately."""
        return self.fds - self.grpc_connections


def open_fds(pid: int) -> dict[int, str]:
    """The process's open fds and what each points at (``socket:[inode]``, a path, ...)."""
    targets: dict[int, str] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets[int(fd.name)] = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
    return targets


def fd_kinds(targets: dict[int, str]) -> dict[str, int]:
    """Open fds by what they point at ("socket", "pipe", a file's path, ...)."""
    return dict(
        Counter(
            target.split(":", 1)[0]
            if target.startswith(("socket:", "pipe:", "anon_inode:"))
            else target
            for target in targets.values()
        )
    )


def fds_at_rest(process: psutil.Process, grpc_port: int) -> tuple[int, int, dict[str, int]]:
    """(open fds, established connections on the vision service's gRPC port, fd kinds), read
    while no socket of the process is between two states: a connection being replaced (the old
    one shut down, its fd not yet closed) would count as an extra fd for a moment."""

    def grpc_sockets() -> list[tuple[int, str]]:
        return sorted(
            (c.fd, c.status)
            for c in process.net_connections(kind="tcp")
            if c.status != psutil.CONN_LISTEN
            and grpc_port in (c.laddr.port if c.laddr else 0, c.raddr.port if c.raddr else 0)
        )

    deadline = time.monotonic() + 10
    while True:
        before = grpc_sockets()
        targets = open_fds(process.pid)
        listed = {c.fd for c in process.net_connections(kind="all")}
        after = grpc_sockets()
        settled = all(status == psutil.CONN_ESTABLISHED for _, status in after)
        sockets = {fd for fd, target in targets.items() if target.startswith("socket:")}
        if before == after and settled and sockets <= listed:
            return len(targets), len(after), fd_kinds(targets)
        assert time.monotonic() < deadline, f"gRPC sockets still changing state: {after}"
        time.sleep(0.05)


def footprint(pid: int, grpc_port: int) -> Footprint:
    process = psutil.Process(pid)
    names: dict[str, int] = {}
    for thread in process.threads():
        try:
            name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        names[name] = names.get(name, 0) + 1
    fds, connections, kinds = fds_at_rest(process, grpc_port)
    return Footprint(
        process.memory_info().rss, fds, connections, process.num_threads(), names, kinds
    )


# gRPC's event engine runs an elastic pool ("event_engine" threads): it adds a thread when all
# of them are blocked and its lifeguard retires idle ones later, so the pool's size at a sample
# is gRPC's choice of the moment (it grew 4 -> 5 once between two idle samples). Every other
# thread of the services must not grow.
ELASTIC_THREADS = "event_engine"


def fixed_threads(sample: Footprint) -> int:
    """The threads of a sample that are not gRPC's elastic pool."""
    return sum(n for name, n in sample.thread_names.items() if name != ELASTIC_THREADS)


def engine_core(stack: Stack) -> psutil.Process:
    children = psutil.Process(stack.llm.proc.pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
    assert len(cores) == 1, [(c.pid, c.name()) for c in children]
    return cores[0]


def settle(stack: Stack) -> None:
    """Wait until no request holds a slot and the language service holds no client
    connection any more: its fds are then those of an idle service."""
    deadline = time.monotonic() + 20
    while scrape_metric(stack.base_url, "dvd:requests_in_flight") != 0:
        assert time.monotonic() < deadline, "requests still hold a slot after the load"
        time.sleep(0.2)
    port = int(stack.base_url.rsplit(":", 1)[1])
    process = psutil.Process(stack.llm.proc.pid)
    deadline = time.monotonic() + 20
    while held := [
        c
        for c in process.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
    ]:
        assert time.monotonic() < deadline, f"client connections still open: {held}"
        time.sleep(0.1)


def restart_vision(stack: Stack, tiny_model: Any, log_dir: Any) -> tuple[float, float]:
    """SIGKILL the vision service, start it again on its address once the port is released;
    (killed at, serving at)."""
    assert stack.vision is not None
    stack.vision.signal(signal.SIGKILL)
    killed = time.monotonic()
    stack.vision.proc.wait(10)
    stack.vision = restart_vision_server(
        stack.vision, "soak-vision-restarted", tiny_model, stack.vision_target, log_dir, VISION_ARGS
    )
    return killed, time.monotonic()


def vision_back_in_language_service(stack: Stack) -> float:
    """When the language service's /health says its vision service serves again."""
    deadline = time.monotonic() + 60
    while True:
        try:
            reply = httpx.get(f"{stack.base_url}/health", timeout=10)
            if reply.status_code == 200 and reply.json()["vision"] == "serving":
                return time.monotonic()
        except httpx.HTTPError:
            pass  # the API is loaded: try again
        assert time.monotonic() < deadline, "the language service never reconnected"
        time.sleep(0.1)


def test_mixed_soak_with_a_vision_restart(soaked, tiny_models, log_dir, record_property):
    """Five phases of load: warm-up; steady; the vision service killed and restarted in the
    middle of the third; the new vision process warming up; steady. Assert zero 5xx but the
    injected ones, no slot held, no fd or thread growth, and at most 10% memory growth of
    both services after warm-up."""
    ledger = Ledger()
    phase_s = SOAK_S / 5
    assert soaked.vision is not None
    burst(soaked, ledger)  # warm-up
    run_load(soaked, phase_s, seed=0, ledger=ledger)
    settle(soaked)
    grpc_port = int(soaked.vision_target.rsplit(":", 1)[1])
    llm_start = footprint(soaked.llm.proc.pid, grpc_port)
    vision_start = footprint(soaked.vision.proc.pid, grpc_port)
    core_start = engine_core(soaked).memory_info().rss

    async def fault_in_the_middle() -> tuple[float, float]:
        # Half a phase of load, the restart under load, then the rest of the phase.
        loop = asyncio.get_running_loop()
        load = loop.run_in_executor(None, run_load, soaked, phase_s, 2, ledger)
        await asyncio.sleep(phase_s / 2)
        killed, _ = await loop.run_in_executor(
            None, restart_vision, soaked, tiny_models["hf"], log_dir
        )
        # Back once the language service itself serves images again (its channel reconnects
        # with a backoff): the window of the injected 503s ends there, not at a fixed time.
        back = await loop.run_in_executor(None, vision_back_in_language_service, soaked)
        await load
        return killed, back

    run_load(soaked, phase_s, seed=1, ledger=ledger)
    settle(soaked)
    vision_before_kill = footprint(soaked.vision.proc.pid, grpc_port)
    killed, back = asyncio.run(fault_in_the_middle())
    settle(soaked)
    burst(soaked, ledger)  # the new vision process warms up
    run_load(soaked, phase_s, seed=3, ledger=ledger)
    settle(soaked)
    vision_restarted = footprint(soaked.vision.proc.pid, grpc_port)
    run_load(soaked, phase_s, seed=4, ledger=ledger)
    settle(soaked)
    llm_end = footprint(soaked.llm.proc.pid, grpc_port)
    vision_end = footprint(soaked.vision.proc.pid, grpc_port)
    core_end = engine_core(soaked).memory_info().rss

    outcomes = ledger.outcomes
    injected = [
        o
        for o in outcomes
        if o.status == 503 and o.error_code == "vision_unavailable" and o.ended >= killed
        if o.started <= back
    ]
    unexpected = [o for o in outcomes if o.status != o.expected and o not in injected]
    figures = {
        "requests": len(outcomes),
        "seconds": round(SOAK_S, 1),
        "by kind": {kind: ledger.count(kind) for kind in sorted({o.kind for o in outcomes})},
        "bad inputs tried": sorted(ledger.bad_inputs),
        "injected 503s": len(injected),
        "llm rss MiB": (llm_start.rss >> 20, llm_end.rss >> 20),
        "engine core rss MiB": (core_start >> 20, core_end >> 20),
        "vision rss MiB (first process)": (vision_start.rss >> 20, vision_before_kill.rss >> 20),
        "vision rss MiB (restarted)": (vision_restarted.rss >> 20, vision_end.rss >> 20),
        "llm fds, threads": (
            (llm_start.fds_but_grpc_connections, llm_end.fds_but_grpc_connections),
            (llm_start.threads, llm_end.threads),
        ),
        "vision fds, threads": (
            (vision_restarted.fds_but_grpc_connections, vision_end.fds_but_grpc_connections),
            (vision_restarted.threads, vision_end.threads),
        ),
    }
    figures["llm threads"] = (llm_start.thread_names, llm_end.thread_names)
    figures["vision threads"] = (vision_restarted.thread_names, vision_end.thread_names)
    record_property("soak", figures)
    print(json.dumps(figures, indent=1))  # the figures docs/security.md reports
    assert not unexpected, [(o.kind, o.status, o.error_code) for o in unexpected[:20]]
    assert all(o.status < 500 or o in injected for o in outcomes)
    assert len(ledger.bad_inputs) == len(BAD_INPUT)  # every kind of bad input was tried
    assert scrape_metric(soaked.base_url, "dvd:requests_in_flight") == 0
    # One gRPC connection (the language service's one channel), or none between the vision
    # service ending an aged one and the next call or health check.
    for sample in (llm_start, llm_end, vision_restarted, vision_end):
        assert sample.grpc_connections <= 1, sample
    assert llm_end.fds_but_grpc_connections <= llm_start.fds_but_grpc_connections, (
        llm_start.fd_kinds,
        llm_end.fd_kinds,
    )
    assert fixed_threads(llm_end) <= fixed_threads(llm_start)
    assert vision_end.fds_but_grpc_connections <= vision_restarted.fds_but_grpc_connections, (
        vision_restarted.fd_kinds,
        vision_end.fd_kinds,
    )
    assert fixed_threads(vision_end) <= fixed_threads(vision_restarted)
    assert llm_end.rss <= 1.10 * llm_start.rss
    assert core_end <= 1.10 * core_start
    assert vision_before_kill.rss <= 1.10 * vision_start.rss
    assert vision_end.rss <= 1.10 * vision_restarted.rss
    assert httpx.get(f"{soaked.base_url}/health", timeout=10).json() == {
        "status": "ok",
        "engine": "serving",
        "vision": "serving",
    }


# ---- last: the engine dies (this ends the module's deployment) -----------------------------


def test_killed_engine_core_fails_requests_and_exits_non_zero(soaked):
    """kill -9 of vLLM's engine core under load: in-flight requests end with 503 (not a
    hang), /health turns 503, and the language service exits with a non-zero status."""
    url = f"{soaked.base_url}/v1/chat/completions"
    long_text = _body(TEXT, max_tokens=3000, min_tokens=3000)
    results: dict[str, Any] = {}

    async def in_flight() -> None:
        async with httpx.AsyncClient(timeout=120) as client:

            async def plain(index: int) -> None:
                started = time.monotonic()
                reply = await client.post(url, json=long_text)
                results[f"plain{index}"] = (reply.status_code, reply.json(), started)

            async def streamed(index: int) -> None:
                async with client.stream("POST", url, json={**long_text, "stream": True}) as r:
                    events = [line async for line in r.aiter_lines() if line.startswith("data")]
                results[f"stream{index}"] = (r.status_code, events)

            async def killer() -> None:
                # Generous: on a loaded 2-vCPU machine the four requests took over 30 s to
                # all be running once.
                deadline = time.monotonic() + 60
                while scrape_metric(soaked.base_url, "vllm:num_requests_running") < 4:
                    assert time.monotonic() < deadline, "the load never reached the engine"
                    await asyncio.sleep(0.1)
                core = engine_core(soaked)
                core.send_signal(signal.SIGKILL)
                results["killed"] = time.monotonic()

            await asyncio.gather(plain(0), plain(1), streamed(0), streamed(1), killer())

    asyncio.run(asyncio.wait_for(in_flight(), 120))
    killed = results["killed"]
    for index in range(2):
        status, body, _ = results[f"plain{index}"]
        assert status == 503 and body["error"]["code"] == "engine_unavailable", body
        status, events = results[f"stream{index}"]
        assert status == 200 and events[-1] == "data: [DONE]"
        assert "engine_unavailable" in events[-2], events[-3:]

    # /health says 503 until the process is gone; then nothing listens any more.
    health: list[int | str] = []
    deadline = killed + 30
    while soaked.llm.alive and time.monotonic() < deadline:
        try:
            health.append(httpx.get(f"{soaked.base_url}/health", timeout=2).status_code)
        except httpx.HTTPError as exc:
            health.append(type(exc).__name__)
        time.sleep(0.05)
    assert 200 not in health and 503 in health, health
    code = soaked.llm.proc.wait(60)  # a hang guard: the process exits on its own
    assert code not in (0, None)
    assert "exiting with status 1" in soaked.llm.log_tail(200)

"""The language service's tracing, its pure pieces: the Server-Timing header
(written by the language service, read back by it and by dvd-bench), the middleware that puts
it on every response, and what tracing off costs: no SDK module, no span."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
from helpers import REPO_ROOT
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from clients.benchmark import parse_server_timing as bench_parse_server_timing
from llm_server import tracing
from llm_server.api.middleware import ServerTimingMiddleware


def test_server_timing_is_milliseconds_per_stage_in_order() -> None:
    timings = tracing.StageTimings()
    timings.add("admission", 0.000012)
    timings.add("media", 0.25)
    timings.add("vision", 1.5)
    timings.add("media", 0.25)  # met twice: adds up
    timings.add("vision.queue", -0.001)  # a clock step backwards is no negative duration
    assert timings.header() == (
        "admission;dur=0.012, media;dur=500.000, vision;dur=1500.000, vision.queue;dur=0.000"
    )


@pytest.mark.parametrize("parse", [tracing.parse_server_timing, bench_parse_server_timing])
def test_server_timing_reads_back(parse) -> None:  # type: ignore[no-untyped-def]
    header = tracing.server_timing({"admission": 0.001, "vision.queue": 0.0405})
    assert parse(header) == {"admission": 1.0, "vision.queue": 40.5}
    # What other servers send too: descriptions, quoted values, metrics without a duration,
    # several header lines joined with commas.
    assert parse('cache;desc="Cache Read";dur=23.2, db;dur=53, app;dur=47.2') == {
        "cache": 23.2,
        "db": 53.0,
        "app": 47.2,
    }
    assert parse('miss, cdn;dur="2", total;desc=x') == {"cdn": 2.0}
    assert parse("a;dur=1, a;dur=2") == {"a": 3.0}
    assert parse("") == {}
    assert parse("x;dur=fast") == {}


def test_stage_records_its_duration_without_tracing() -> None:
    async def request() -> tracing.StageTimings:
        timings = tracing.begin_request()
        with tracing.stage("media") as span:
            assert span is None  # tracing off: no span object at all
        with pytest.raises(ValueError), tracing.stage("vision"):
            raise ValueError("a failed stage is still timed")
        tracing.record("vision.queue", 0.002)
        return timings

    timings = asyncio.run(request())
    assert list(timings.durations) == ["media", "vision", "vision.queue"]
    assert timings.durations["vision.queue"] == 0.002


def test_the_body_stage_runs_from_the_request_arrival() -> None:
    async def request() -> tracing.StageTimings:
        timings = tracing.begin_request()
        await asyncio.sleep(0.05)  # the framework reading and validating the body
        tracing.stage_since_arrival("body")
        return timings

    timings = asyncio.run(request())
    assert list(timings.durations) == ["body"]
    assert timings.durations["body"] >= 0.05


def test_stages_outside_a_request_are_not_recorded() -> None:
    async def outside() -> None:
        with tracing.stage("media"):
            pass
        tracing.record("vision.queue", 1.0)
        tracing.stage_since_arrival("body")

    asyncio.run(outside())  # no request in this context: nothing to add to, no error


async def _staged(request: Request) -> Response:
    with tracing.stage("admission"):
        pass
    tracing.record("vision", 0.5)
    if request.url.path == "/stream":

        async def body():  # type: ignore[no-untyped-def]
            tracing.record("engine.decode", 1.0)  # after the headers: not in them
            yield b"data: x\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")
    return JSONResponse({"ok": True}, status_code=400)


async def _unstaged(request: Request) -> Response:
    return Response("ok")  # no stage: no header


APP = ServerTimingMiddleware(
    Starlette(
        routes=[
            *(Route(path, _staged, methods=["POST"]) for path in ("/json", "/stream")),
            Route("/plain", _unstaged, methods=["POST"]),
        ]
    )
)


def _post(path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=APP)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path)

    return asyncio.run(go())


def test_every_response_carries_its_stages() -> None:
    answer = _post("/json")
    assert answer.status_code == 400  # errors too
    timing = tracing.parse_server_timing(answer.headers["server-timing"])
    assert list(timing) == ["admission", "vision"]
    assert timing["vision"] == 500.0


def test_a_stream_carries_the_stages_ended_before_its_headers() -> None:
    answer = _post("/stream")
    timing = tracing.parse_server_timing(answer.headers["server-timing"])
    assert list(timing) == ["admission", "vision"]


def test_a_response_without_stages_has_no_header() -> None:
    assert "server-timing" not in _post("/plain").headers


ZERO_COST_PROBE = """
import asyncio, json, sys
import httpx
from llm_server import tracing
from llm_server.api.middleware import ServerTimingMiddleware
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def handler(request):
    with tracing.stage("media") as span:
        assert span is None
    assert tracing.grpc_metadata() is None
    assert tracing.start_span("engine") is None
    return JSONResponse({})

async def main():
    app = ServerTimingMiddleware(Starlette(routes=[Route("/", handler, methods=["POST"])]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        parent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        answer = await client.post("/", headers={"traceparent": parent})
    return answer.headers.get("server-timing")

configured = tracing.configure()
header = asyncio.run(main())
print(json.dumps({
    "configured": configured,
    "header": header,
    "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")),
}))
"""


def test_tracing_off_imports_no_sdk_and_makes_no_span() -> None:
    """In a fresh process, without the variables: a request through the middleware and a
    stage leaves OpenTelemetry's SDK unimported (no provider, processor or exporter)."""
    env = {"PATH": "/usr/bin:/bin", "OTEL_SERVICE_NAME": "probe"}
    run = subprocess.run(
        [sys.executable, "-c", ZERO_COST_PROBE],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO_ROOT,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["configured"] is False
    assert report["sdk"] == []
    assert report["header"].startswith("media;dur=")


def test_tracing_on_is_configured_from_the_variables_alone() -> None:
    """The same probe with an OTLP endpoint set: tracing starts (the SDK is loaded)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing is exported while the probe runs
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1",  # the export at exit: nobody listens
    }
    probe = ZERO_COST_PROBE.replace("assert span is None", "assert span is not None")
    probe = probe.replace("assert tracing.grpc_metadata() is None", "")
    probe = probe.replace('assert tracing.start_span("engine") is None', "")
    run = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO_ROOT,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["configured"] is True
    assert "opentelemetry.sdk.trace" in report["sdk"]

"""Tracing across the hop, with the real services exporting OTLP to a receiver this test
starts on 127.0.0.1: one request's spans from both services form one trace that nests as
documented, with their attributes; an incoming ``traceparent`` is honoured; a trace sampled
off records nothing on either service; a failure is an error span on the stage that failed.
Also the ``Server-Timing`` header, whose names are the spans'."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import (
    SERVED_MODEL_NAME,
    Stack,
    data_url,
    gradient_image,
    noise_image,
    process_fixture,
    start_stacks,
)
from otlp_receiver import OTLPReceiver, ReceivedSpan

from llm_server.tracing import parse_server_timing

LLM, VISION = "dvd-llm", "dvd-vision"
SPAN_WAIT_S = 60


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@process_fixture(scope="module")
def traced_stack(
    tiny_flash_models: dict[str, Path], log_dir: Path, receiver: OTLPReceiver
) -> Iterator[Stack]:
    """Both services on the Flash checkpoint (so the router runs: ``vision.route``), tracing
    on through the standard variables only, exporting to ``receiver``."""
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 0.1 s, not 5 s
    }
    with pytest.MonkeyPatch.context() as patch:  # the vision server inherits this process's
        for key, value in env.items():
            patch.setenv(key, value)
        stack = start_stacks({"flash": tiny_flash_models["hf"]}, log_dir, llm_env=env)["flash"]
    try:
        yield stack
    finally:
        stack.stop()


def chat(stack: Stack, images: list[str], headers: dict[str, str] | None = None) -> httpx.Response:
    content: list[dict[str, object]] = [{"type": "text", "text": "Describe these."}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    body = {
        "model": SERVED_MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
    }
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=body, headers=headers or {}, timeout=120
    )


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """(header, trace id, parent span id) of a fresh W3C trace context."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def trace_complete(trace_id: str, names: set[tuple[str, str]]):
    """A ``wait_for`` condition: every (service, span name) of ``names`` in the trace."""

    def done(spans: list[ReceivedSpan]) -> bool:
        got = {(s.service, s.name) for s in spans if s.trace_id == trace_id}
        return names <= got

    return done


def one(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, f"{len(found)} {name} spans of {service}"
    return found[0]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan, name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id and s.name == name]


def test_two_images_make_one_trace_across_both_services(
    traced_stack: Stack, receiver: OTLPReceiver
) -> None:
    header, trace_id, caller_span = traceparent()
    images = [data_url(noise_image(500, 300, seed=31)), data_url(gradient_image(320, 320, 32))]
    response = chat(traced_stack, images, {"traceparent": header})
    assert response.status_code == 200, response.text
    expected = {
        (LLM, "http.request"),
        (LLM, "body"),
        (LLM, "admission"),
        (LLM, "media"),
        (LLM, "vision"),
        (LLM, "engine"),
        (LLM, "engine.queued"),
        (LLM, "engine.prefill"),
        (LLM, "engine.decode"),
        (VISION, "vision.request"),
        (VISION, "vision.preprocess"),
        (VISION, "vision.queue"),
        (VISION, "vision.pass"),
        (VISION, "vision.route"),
        (VISION, "vision.deliver"),
    }
    received = receiver.wait_for(trace_complete(trace_id, expected), SPAN_WAIT_S)
    spans = [s for s in received if s.trace_id == trace_id]

    # The language service: the HTTP request under the caller's span, its stages under it.
    http = one(spans, LLM, "http.request")
    assert http.parent_span_id == caller_span
    assert http.kind == 2  # server
    assert http.attributes["http.response.status_code"] == 200
    assert http.attributes["http.route"] == "/v1/chat/completions"
    assert http.attributes["dvd.request_id"] == response.headers["x-request-id"]
    for name in ("body", "admission", "media", "vision", "engine"):
        assert one(spans, LLM, name).parent_span_id == http.span_id, name
    # The body (read, parsed, validated before the route ran) from the request's arrival.
    body, admission = one(spans, LLM, "body"), one(spans, LLM, "admission")
    assert body.start_ns == http.start_ns and body.end_ns <= admission.start_ns
    media = one(spans, LLM, "media")
    assert media.attributes["dvd.images"] == 2
    assert media.attributes["dvd.media.bytes"] > 0
    vision = one(spans, LLM, "vision")
    assert vision.kind == 3  # client
    assert vision.attributes["dvd.images"] == 2
    usage = response.json()["usage"]
    engine = one(spans, LLM, "engine")
    assert engine.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert engine.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert "first_token" in engine.events
    phases = [one(spans, LLM, f"engine.{phase}") for phase in ("queued", "prefill", "decode")]
    for phase in phases:
        assert phase.parent_span_id == engine.span_id
    # Consecutive, from vLLM's own timestamps: queued ends where prefill starts, and so on.
    for earlier, later in zip(phases, phases[1:], strict=False):
        assert earlier.end_ns == later.start_ns
    assert vision.end_ns <= engine.start_ns

    # The vision service: its request under the client's span, across the gRPC hop.
    request = one(spans, VISION, "vision.request")
    assert request.parent_span_id == vision.span_id
    assert request.kind == 2
    assert request.attributes["dvd.images"] == 2
    assert request.attributes["dvd.request_id"] == response.headers["x-request-id"]
    assert vision.start_ns <= request.start_ns and request.end_ns <= vision.end_ns
    preprocess = children(spans, request, "vision.preprocess")
    assert sorted(s.attributes["dvd.item"] for s in preprocess) == ["image 0", "image 1"]
    tiles = response.json()["vision"]["tiles"]
    assert sum(s.attributes["dvd.tiles"] for s in preprocess) == tiles
    queues = children(spans, request, "vision.queue")
    assert len(queues) == 2
    passes = children(spans, request, "vision.pass")
    # Each image's tiles, pass by pass: together, every tile of the request.
    assert sum(s.attributes["dvd.pass.item_tiles"] for s in passes) == tiles
    for forward in passes:
        assert forward.attributes["dvd.pass.id"] >= 1
        assert forward.attributes["dvd.pass.tiles"] >= forward.attributes["dvd.pass.item_tiles"]
    route = one(spans, VISION, "vision.route")
    assert route.parent_span_id == request.span_id
    assert route.attributes["dvd.tiles"] == tiles
    compressed = response.json()["vision"]["compressed_tiles"]
    assert route.attributes["dvd.compressed_tiles"] == compressed
    delivered = children(spans, request, "vision.deliver")
    assert sorted(s.attributes["dvd.item"] for s in delivered) == [0, 1]
    for delivery in delivered:
        assert delivery.attributes["dvd.transport"] in {"shared_memory", "grpc"}
        assert delivery.attributes["dvd.bytes"] > 0
    assert not any(s.error for s in spans)

    # Server-Timing: the stages before the answer, named as the spans are.
    timing = parse_server_timing(response.headers["server-timing"])
    for name in ("body", "admission", "media", "vision", "vision.queue", "engine.queued"):
        assert name in timing, name
    assert timing["vision"] >= timing["vision.queue"]


def test_a_trace_sampled_off_records_nothing(traced_stack: Stack, receiver: OTLPReceiver) -> None:
    off, off_trace, _ = traceparent(sampled=False)
    image = [data_url(noise_image(200, 200, seed=33))]
    response = chat(traced_stack, image, {"traceparent": off})
    assert response.status_code == 200, response.text
    assert "vision" in parse_server_timing(response.headers["server-timing"])
    # A sampled request after it: once its spans from both services are in, any span of the
    # first (ended earlier, exported in order by the same processes) would be too.
    on, on_trace, _ = traceparent()
    assert chat(traced_stack, image, {"traceparent": on}).status_code == 200
    after = {(LLM, "http.request"), (LLM, "engine"), (VISION, "vision.request")}
    spans = receiver.wait_for(trace_complete(on_trace, after), SPAN_WAIT_S)
    assert [s.name for s in spans if s.trace_id == off_trace] == []


def test_a_request_without_traceparent_starts_its_own_trace(
    traced_stack: Stack, receiver: OTLPReceiver
) -> None:
    response = chat(traced_stack, [data_url(gradient_image(256, 200, seed=34))])
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]

    def http_span(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
        return next(
            (
                s
                for s in spans
                if s.name == "http.request" and s.attributes.get("dvd.request_id") == request_id
            ),
            None,
        )

    http = http_span(receiver.wait_for(lambda spans: http_span(spans) is not None, SPAN_WAIT_S))
    assert http is not None
    assert http.parent_span_id == ""  # a root
    expected = {(LLM, "vision"), (VISION, "vision.request")}
    spans = receiver.wait_for(trace_complete(http.trace_id, expected), SPAN_WAIT_S)
    request = one([s for s in spans if s.trace_id == http.trace_id], VISION, "vision.request")
    assert request.attributes["dvd.request_id"] == request_id


def test_a_failure_is_an_error_span_on_the_stage_that_failed(
    traced_stack: Stack, receiver: OTLPReceiver
) -> None:
    header, trace_id, _ = traceparent()
    # A PNG signature, then garbage: the language service passes it on, the vision service
    # cannot decode it.
    broken = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" + "A" * 64
    response = chat(traced_stack, [broken], {"traceparent": header})
    assert response.status_code == 400, response.text
    expected = {
        (LLM, "http.request"),
        (LLM, "vision"),
        (VISION, "vision.request"),
        (VISION, "vision.preprocess"),
    }
    spans = receiver.wait_for(trace_complete(trace_id, expected), SPAN_WAIT_S)
    spans = [s for s in spans if s.trace_id == trace_id]
    request = one(spans, VISION, "vision.request")
    assert request.error
    assert request.attributes["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT
    assert one(spans, LLM, "vision").error
    assert any(s.error for s in children(spans, request, "vision.preprocess"))
    http = one(spans, LLM, "http.request")
    assert http.attributes["http.response.status_code"] == 400
    assert "engine" not in {s.name for s in spans}  # it never reached the engine
    assert "vision" in parse_server_timing(response.headers["server-timing"])


def test_a_stream_carries_server_timing_of_what_preceded_its_first_byte(
    traced_stack: Stack,
) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(noise_image(300, 200, 35))}}
    content = [{"type": "text", "text": "Describe it."}, image]
    body = {
        "model": SERVED_MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "stream": True,
    }
    url = f"{traced_stack.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        assert response.status_code == 200
        timing = parse_server_timing(response.headers["server-timing"])
        assert response.read().rstrip().endswith(b"data: [DONE]")
    assert {"body", "admission", "media", "vision", "vision.queue"} <= set(timing)
    # The engine had not started when the headers went out.
    assert not any(name.startswith("engine") for name in timing)

"""The language service's OpenTelemetry tracing, and the per-request stage timings that feed
both its spans and the ``Server-Timing`` header.

Tracing is configured only by the standard ``OTEL_*`` environment variables, by the rule
both services share (``telemetry.otel``). Off, no SDK module is imported and no span object is
made: each stage costs one check of ``_tracer`` and the two clock reads its ``Server-Timing``
entry needs.

Span names (``Server-Timing`` uses the same): ``http.request``, ``body`` (the request's
body read, parsed and validated, before the route runs), ``admission``, ``media``,
``vision`` (the Encode call, client side), ``vision.queue`` (the vision service's own span;
here only its duration, for ``Server-Timing``), ``engine`` with ``engine.queued``,
``engine.prefill`` and ``engine.decode`` (from vLLM's per-request timestamps).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from protos.trace_context import TRACE_CONTEXT_KEYS
from telemetry import otel

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)

SERVICE_NAME = "dvd-llm"

# Set by ``configure`` when tracing is on; None (the constant check) when it is off.
_tracer: Tracer | None = None


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Start tracing when the environment asks for it (once per process, before serving);
    True when it is on."""
    global _tracer
    environ = os.environ if environ is None else environ
    if not otel.tracing_requested(environ):
        return False
    if environ is os.environ:
        # vLLM's engine processes start a tracer of their own when they inherit a traces
        # endpoint, speaking gRPC unless told otherwise: the same protocol as ours ...
        os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", otel.otlp_protocol(environ))
        # ... and name their start-up spans after this service, not "unknown_service".
        os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
    _tracer = otel.start_tracer(environ, SERVICE_NAME, "dvd.llm_server")
    logger.info("tracing on: OTLP (%s) as %s", otel.otlp_protocol(environ), SERVICE_NAME)
    return True


def shutdown() -> None:
    """Export what is still buffered (at exit)."""
    if _tracer is not None:
        otel.shutdown()


def enabled() -> bool:
    return _tracer is not None


def tracer() -> Tracer | None:
    """The service's tracer; None when tracing is off."""
    return _tracer


# ---- Server-Timing ---------------------------------------------------------------------------


class StageTimings:
    """One request's stages and their durations in seconds, in the order they ended; a
    stage met twice (two engine calls) adds up. Made when the request arrives."""

    __slots__ = ("durations", "started", "started_epoch_ns")

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}
        self.started = time.perf_counter()
        self.started_epoch_ns = time.time_ns()  # where a span that starts with it starts

    def add(self, name: str, seconds: float) -> None:
        self.durations[name] = self.durations.get(name, 0.0) + max(seconds, 0.0)

    def header(self) -> str:
        """The ``Server-Timing`` value: ``name;dur=<milliseconds>`` per stage."""
        return server_timing(self.durations)


def server_timing(durations: Mapping[str, float]) -> str:
    """``Server-Timing`` for stage durations in seconds: ``admission;dur=0.012, media;dur=3.4``
    (milliseconds, as the header defines ``dur``). Names must be HTTP tokens."""
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in durations.items())


def parse_server_timing(value: str) -> dict[str, float]:
    """The durations of a ``Server-Timing`` value, in milliseconds, by name (a metric without
    ``dur`` is left out; a name met twice adds up)."""
    durations: dict[str, float] = {}
    for metric in value.split(","):
        name, *params = (piece.strip() for piece in metric.split(";"))
        for param in params:
            key, _, raw = param.partition("=")
            if key.strip().lower() == "dur" and name:
                with contextlib.suppress(ValueError):
                    durations[name] = durations.get(name, 0.0) + float(raw.strip().strip('"'))
    return durations


_timings: ContextVar[StageTimings | None] = ContextVar("dvd_stage_timings", default=None)


def begin_request() -> StageTimings:
    """A fresh ``StageTimings`` for the request running in this context (the HTTP middleware
    calls it; tasks started from the request see the same one)."""
    timings = StageTimings()
    _timings.set(timings)
    return timings


def record(name: str, seconds: float) -> None:
    """A stage measured elsewhere (the vision service's queue wait), for ``Server-Timing``."""
    timings = _timings.get()
    if timings is not None:
        timings.add(name, seconds)


def stage_since_arrival(name: str) -> None:
    """A stage that began when the request arrived and ends now: reading, parsing and
    validating the body, done by the framework before any route code runs. A
    ``Server-Timing`` entry, and with tracing on a span of the same name."""
    timings = _timings.get()
    if timings is None:
        return
    timings.add(name, time.perf_counter() - timings.started)
    if _tracer is not None:
        _tracer.start_span(name, start_time=timings.started_epoch_ns).end()


@contextlib.contextmanager
def stage(
    name: str, attributes: Mapping[str, Any] | None = None, client: bool = False
) -> Iterator[Span | None]:
    """Time one stage of the current request: a ``Server-Timing`` entry, and with tracing on
    a span of the same name (current while the stage runs; an exception is recorded on it
    and marks it failed). Yields the span, or None when tracing is off. ``client``: the span
    calls another service."""
    started = time.perf_counter()
    try:
        if _tracer is None:
            yield None
        else:
            from opentelemetry.trace import SpanKind

            kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
            with _tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
                yield span
    finally:
        record(name, time.perf_counter() - started)


def grpc_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current trace context as gRPC metadata for the vision service (``traceparent``,
    ``tracestate``); None when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple((key, carrier[key]) for key in TRACE_CONTEXT_KEYS if key in carrier)


# ---- spans measured after the fact -----------------------------------------------------------


def start_span(name: str, attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A span under the current one that is not made current (it outlives a ``yield`` of an
    async generator); end it with ``end_span``. None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, attributes=attributes)


end_span = otel.end_span


def monotonic_epoch_offset_ns() -> int:
    """What turns a ``time.monotonic()`` reading (vLLM's engine core stamps its events with
    it; the clock is the host's, shared by processes), in nanoseconds, into nanoseconds since
    the epoch. Taken once per request, so that its spans' edges meet exactly."""
    return time.time_ns() - time.monotonic_ns()


def engine_spans(parent: Span | None, stats: Any, prompt_tokens: int) -> None:
    """``engine.queued``, ``engine.prefill`` and ``engine.decode`` from vLLM's per-request
    timestamps (``RequestOutput.metrics``), as ``Server-Timing`` entries and, with tracing on,
    as children of ``parent`` (the ``engine`` span), with a ``first_token`` event on it."""
    if stats is None or not stats.queued_ts or not stats.scheduled_ts:
        return
    phases = [("engine.queued", stats.queued_ts, stats.scheduled_ts)]
    if stats.first_token_ts:
        phases.append(("engine.prefill", stats.scheduled_ts, stats.first_token_ts))
        if stats.last_token_ts > stats.first_token_ts:
            phases.append(("engine.decode", stats.first_token_ts, stats.last_token_ts))
    for name, start, end in phases:
        record(name, end - start)
    if _tracer is None or parent is None:
        return
    from opentelemetry import trace

    context = trace.set_span_in_context(parent)
    offset = monotonic_epoch_offset_ns()

    def epoch_ns(timestamp: float) -> int:
        return offset + round(timestamp * 1e9)

    tokens = {
        "gen_ai.usage.input_tokens": prompt_tokens,
        "gen_ai.usage.output_tokens": int(stats.num_generation_tokens),
    }
    for name, start, end in phases:
        span = _tracer.start_span(
            name, context=context, attributes=tokens, start_time=epoch_ns(start)
        )
        span.end(end_time=epoch_ns(end))
    if stats.first_token_ts:
        parent.add_event("first_token", timestamp=epoch_ns(stats.first_token_ts))
    parent.set_attributes({**tokens, "engine.preemptions": int(stats.num_preemptions)})

"""The language service's OpenTelemetry tracing, and the per-request stage timings that feed
both its spans and the ``Server-Timing`` header.

Tracing is configured only by the standard ``OTEL_*`` environment variables (the SDK reads
them; this module reads only the few that say whether to start it): it is on when
``OTEL_TRACES_EXPORTER`` names ``otlp``, or when that variable is unset and an OTLP endpoint
is (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``);
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off. Off, no SDK module is
imported and no span object is made: each stage costs one check of ``_tracer`` and the two
clock reads its ``Server-Timing`` entry needs.

Span names (``Server-Timing`` uses the same): ``http.request``, ``admission``, ``media``,
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

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)

SERVICE_NAME = "dvd-llm"

# Set by ``configure`` when tracing is on; None (the constant check) when it is off.
_tracer: Tracer | None = None


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` turns tracing on (the rule in the module's docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None and exporters.strip():
        return "otlp" in {name.strip().lower() for name in exporters.split(",")}
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def otlp_protocol(environ: Mapping[str, str]) -> str:
    """``http/protobuf`` (the default, as the OTLP specification recommends) or ``grpc``."""
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    return protocol.strip().lower()


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Start tracing when the environment asks for it (once per process, before serving);
    True when it is on. The sampler (``OTEL_TRACES_SAMPLER``/``_ARG``, parent-based always-on
    by default), the endpoint, headers and timeouts are the SDK's to read."""
    global _tracer
    environ = os.environ if environ is None else environ
    if not tracing_requested(environ):
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter: Any
    if otlp_protocol(environ) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        exporter = HTTPSpanExporter()
    if environ is os.environ:
        # vLLM's engine processes start a tracer of their own when they inherit a traces
        # endpoint, speaking gRPC unless told otherwise: the same protocol as ours ...
        os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", otlp_protocol(environ))
        # ... and name their start-up spans after this service, not "unknown_service".
        os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
    resource = Resource.create({})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("dvd.llm_server")
    logger.info("tracing on: OTLP (%s) as %s", otlp_protocol(environ), SERVICE_NAME)
    return True


def shutdown() -> None:
    """Export what is still buffered (at exit)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    shutdown_provider = getattr(provider, "shutdown", None)
    if shutdown_provider is not None:
        shutdown_provider()


def enabled() -> bool:
    return _tracer is not None


def tracer() -> Tracer | None:
    """The service's tracer; None when tracing is off."""
    return _tracer


# ---- Server-Timing ---------------------------------------------------------------------------


class StageTimings:
    """One request's stages and their durations in seconds, in the order they ended; a
    stage met twice (two engine calls) adds up."""

    __slots__ = ("durations",)

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

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


def end_span(span: Span | None, error: BaseException | None = None) -> None:
    if span is None:
        return
    if error is not None:
        mark_failed(span, error)
    span.end()


def mark_failed(span: Span, error: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


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

"""The vision service's OpenTelemetry tracing.

Configured as the language service's is, only by the standard ``OTEL_*`` environment
variables, by the rule both services share (``telemetry.otel``). Off, no SDK module is
imported, no span object is made, and every hook below is one check of ``_tracer``.

Spans: ``vision.request`` (one Encode call, under the caller's ``traceparent`` from the call's
metadata), ``vision.preprocess`` (decoding and tiling one image or video),
``vision.queue`` (one item's tiles waiting for their first forward pass),
``vision.pass`` (each forward pass the item's tiles joined: its id and size, since one pass
serves many requests), ``vision.route`` (the ViR decision over the request's tiles),
``vision.deliver`` (one item's rows reaching the caller: shared memory or the stream).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from protos.trace_context import TRACE_CONTEXT_KEYS
from telemetry import otel

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)

SERVICE_NAME = "dvd-vision"
T = TypeVar("T")

_tracer: Tracer | None = None


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Start tracing when the environment asks for it (once, before serving); True when on."""
    global _tracer
    environ = os.environ if environ is None else environ
    if not otel.tracing_requested(environ):
        return False
    _tracer = otel.start_tracer(environ, SERVICE_NAME, "dvd.vision_server")
    logger.info("tracing on: OTLP (%s)", otel.otlp_protocol(environ))
    return True


def shutdown() -> None:
    """Export what is still buffered (at exit)."""
    if _tracer is not None:
        otel.shutdown()


def use_process_tracing() -> None:
    """Make this module's spans with the tracer provider the process already has: the coupled
    deployment, whose language service started tracing for its process and runs the pipeline
    inside it (its spans then nest under the language service's ``vision`` span)."""
    global _tracer
    from opentelemetry import trace

    _tracer = trace.get_tracer("dvd.vision_server")


def enabled() -> bool:
    return _tracer is not None


@dataclass
class RequestSpan:
    """``vision.request`` and the context token that made it current."""

    span: Span
    token: object


def open_request(
    metadata: Sequence[tuple[str, str | bytes]] | None, attributes: Mapping[str, Any]
) -> RequestSpan | None:
    """Start ``vision.request`` under the trace context of the call's metadata
    (``protos.trace_context``) and make it current in this call's task, so that the
    pipeline's spans nest under it; ``close_request`` ends it. None when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind

    carrier = {
        key: value if isinstance(value, str) else value.decode("latin-1")
        for key, value in metadata or ()
        if key in TRACE_CONTEXT_KEYS
    }
    parent = propagate.extract(carrier)
    request = _tracer.start_span(
        "vision.request", context=parent, kind=SpanKind.SERVER, attributes=attributes
    )
    token = context.attach(trace.set_span_in_context(request, parent))
    return RequestSpan(request, token)


def close_request(
    request: RequestSpan | None, status_code: int, error: BaseException | None
) -> None:
    """End ``vision.request`` with the call's gRPC status (and its error, if it failed)."""
    if request is None:
        return
    from opentelemetry import context

    request.span.set_attribute("rpc.grpc.status_code", status_code)
    end_span(request.span, error)
    context.detach(request.token)  # type: ignore[arg-type]


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span | None]:
    """A span under the current one while the block runs (no ``yield`` of an async generator
    inside it); None when tracing is off."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def traced(work: Awaitable[T], name: str, attributes: Mapping[str, Any]) -> Awaitable[T]:
    """``work`` inside a span (under the current one); ``work`` itself when tracing is off."""
    if _tracer is None:
        return work
    return _traced(work, name, attributes)


async def _traced(work: Awaitable[T], name: str, attributes: Mapping[str, Any]) -> T:
    with span(name, attributes) as current:
        result = await work
        tiles = getattr(result, "num_tiles", None)
        if current is not None and isinstance(tiles, int):
            current.set_attribute("dvd.tiles", tiles)
        return result


def start_span(name: str, attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A span under the current one, not made current (it stays open across a ``yield``);
    end it with ``end_span``. None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, attributes=attributes)


end_span = otel.end_span


# ---- what the batcher saw, as spans after the fact -------------------------------------------


@dataclass(frozen=True)
class PassRecord:
    """One forward pass as one item saw it (``time.perf_counter()`` readings)."""

    pass_id: int
    started: float
    finished: float
    tiles: int  # every tile of the pass, of any request
    item_tiles: int  # this item's tiles in it


def item_spans(
    enqueued_at: float, first_pass_at: float, passes: Sequence[PassRecord], context: Context | None
) -> None:
    """``vision.queue`` and one ``vision.pass`` per forward pass of one encoded item, under
    ``context`` (the current span when None)."""
    if _tracer is None or not first_pass_at:
        return
    offset = time.time_ns() - time.perf_counter_ns()  # once: the spans' edges meet exactly

    def _epoch_ns(perf_counter: float) -> int:
        return offset + round(perf_counter * 1e9)

    queue = _tracer.start_span("vision.queue", context=context, start_time=_epoch_ns(enqueued_at))
    queue.end(end_time=_epoch_ns(first_pass_at))
    for record in passes:
        forward = _tracer.start_span(
            "vision.pass",
            context=context,
            start_time=_epoch_ns(record.started),
            attributes={
                "dvd.pass.id": record.pass_id,
                "dvd.pass.tiles": record.tiles,
                "dvd.pass.item_tiles": record.item_tiles,
            },
        )
        forward.end(end_time=_epoch_ns(record.finished))

"""OpenTelemetry set-up, read only from the standard ``OTEL_*`` environment variables.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names ``otlp``, or when that variable is unset and
an OTLP endpoint is (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``);
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off. The SDK is imported
only when tracing is on; the sampler, endpoint, headers and timeouts are the SDK's to read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer


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


def start_tracer(environ: Mapping[str, str], service_name: str, instrumentation: str) -> Tracer:
    """Install the process's tracer provider (batched OTLP export, over ``otlp_protocol``) and
    return a tracer named ``instrumentation``. The service is named by ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` when they name one, else ``service_name``."""
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
    resource = Resource.create({})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return trace.get_tracer(instrumentation)


def shutdown() -> None:
    """Export what is still buffered (at exit). Call only after ``start_tracer``."""
    from opentelemetry import trace

    shutdown_provider = getattr(trace.get_tracer_provider(), "shutdown", None)
    if shutdown_provider is not None:
        shutdown_provider()


def end_span(span: Span | None, error: BaseException | None = None) -> None:
    """End ``span`` (None: tracing is off), failed with ``error`` when there is one."""
    if span is None:
        return
    if error is not None:
        mark_failed(span, error)
    span.end()


def mark_failed(span: Span, error: BaseException) -> None:
    """Record ``error`` on ``span`` and set its status to error."""
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

"""An OTLP/HTTP trace receiver on 127.0.0.1: decodes each ``ExportTraceServiceRequest``
(protobuf, as the OTLP specification defines it, with ``opentelemetry-proto``) and keeps its
spans, for tests to wait on. ``python tests/support/otlp_receiver.py`` runs one standalone
(the tracing-on benchmark exports to it)."""

from __future__ import annotations

import gzip
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root
    kind: int  # the proto's SpanKind: 1 internal, 2 server, 3 client
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()
    error: bool = False  # status code ERROR
    status_message: str = ""

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one serialized ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest.FromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        events=tuple(event.name for event in span.events),
                        error=span.status.code == 2,  # STATUS_CODE_ERROR
                        status_message=span.status.message,
                    )
                )
    return spans


class OTLPReceiver:
    """Listens on 127.0.0.1 (a port of its own); ``endpoint`` is the traces URL to export to."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                spans = decode(body)
                with receiver._changed:
                    receiver._spans.extend(spans)
                    receiver._changed.notify_all()
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float
    ) -> list[ReceivedSpan]:
        """Every span received, once ``done(spans)`` holds (checked at each export)."""
        with self._changed:
            if not self._changed.wait_for(lambda: done(self._spans), timeout):
                names = sorted({(s.service, s.name) for s in self._spans})
                raise TimeoutError(f"spans not received in {timeout} s; have {names}")
            return list(self._spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    """Print the endpoint; on SIGTERM or SIGINT, write every span received as JSON lines to
    the file named by the first argument (if any), print the count, and exit."""
    import dataclasses
    import json
    import signal

    receiver = OTLPReceiver()
    print(receiver.endpoint, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    spans = receiver.spans
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as out:
            for span in spans:
                out.write(json.dumps(dataclasses.asdict(span)) + "\n")
    print(f"{len(spans)} spans received", flush=True)
    receiver.close()


if __name__ == "__main__":
    main()

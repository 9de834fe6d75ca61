"""How a trace crosses the vision hop: W3C Trace Context (``traceparent``, ``tracestate``) in
the gRPC metadata of the ``Encode`` call, under those lowercase keys, values as the W3C
headers carry them. A call without them starts no trace of its own on the vision service
unless its sampler says so; a ``traceparent`` whose sampled flag is 0 records nothing there.
"""

from __future__ import annotations

# The metadata keys of the W3C Trace Context headers (gRPC metadata keys are lowercase).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_CONTEXT_KEYS = (TRACEPARENT, TRACESTATE)

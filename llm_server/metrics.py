"""Prometheus series of the language service (``dvd:*``), beside vLLM's own (``vllm:*``).

Image-side series are named ``dvd:image_*`` here and ``dvd:vision_*`` in the vision service,
so the coupled mode (both in one process) exposes both without clashes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip

http_requests = Counter(
    "dvd:http_requests",
    "HTTP requests, by route and status code.",
    ["route", "status"],
)
requests_in_flight = Gauge("dvd:requests_in_flight", "Chat completions being served.")
time_to_first_token = Histogram(
    "dvd:time_to_first_token_seconds",
    "From request arrival to the first generated token.",
    buckets=_LATENCY_BUCKETS,
)
e2e_request_latency = Histogram(
    "dvd:e2e_request_latency_seconds",
    "From request arrival to the last generated token.",
    buckets=_LATENCY_BUCKETS,
)
vision_seconds = Histogram(
    "dvd:image_wait_seconds",
    "Time waiting for a request's image embeddings (encode call, queue and transfer included).",
    buckets=_LATENCY_BUCKETS,
)
vision_queue_wait = Histogram(
    "dvd:image_queue_wait_seconds",
    "Time images waited in the vision batcher (as reported by the vision service).",
    buckets=_LATENCY_BUCKETS,
)
vision_encode = Histogram(
    "dvd:image_encode_seconds",
    "Forward-pass time of images (as reported by the vision service).",
    buckets=_LATENCY_BUCKETS,
)
vision_transfer = Histogram(
    "dvd:image_transfer_seconds",
    "Time from an image's header to its last embedding byte on the wire.",
    buckets=_LATENCY_BUCKETS,
)
embedding_bytes = Counter(
    "dvd:image_embedding_bytes",
    "Embedding bytes received from the vision service, by transport (grpc: streamed; "
    "shared_memory: written into this process's segment by a vision service on this host).",
    ["transport"],
)
shared_memory_full = Counter(
    "dvd:image_shared_memory_full",
    "Encode calls that found no free shared memory for their embeddings (they were streamed).",
)
images = Counter("dvd:images", "Images in chat requests.")
image_tokens = Counter("dvd:image_tokens", "Visual tokens of images placed in prompts.")
videos = Counter("dvd:videos", "Videos in chat requests.")
video_tokens = Counter("dvd:video_tokens", "Visual tokens of video frames placed in prompts.")
vir_tokens_saved = Counter(
    "dvd:vir_tokens_saved",
    "Visual tokens the Visual Resolution Router removed from prompts.",
)
prompt_tokens = Counter("dvd:prompt_tokens", "Prompt tokens, image tokens included.")
generation_tokens = Counter("dvd:generation_tokens", "Generated tokens.")

# The vision fleet as this language service places calls on it (--vision-balancing affinity).
fleet_calls = Counter(
    "dvd:fleet_calls",
    "Encode calls sent to each vision replica (retries after a failover included).",
    ["replica"],
)
fleet_tiles_in_flight = Gauge(
    "dvd:fleet_tiles_in_flight",
    "Tiles of this service's Encode calls in flight on each vision replica.",
    ["replica"],
)
fleet_affinity_hits = Counter(
    "dvd:fleet_affinity_hits",
    "Encode calls sent to the replica their cache identity hashes to.",
)
fleet_overflow_redirects = Counter(
    "dvd:fleet_overflow_redirects",
    "Encode calls sent past their replica on the ring because it was over its load bound.",
)
fleet_failovers = Counter(
    "dvd:fleet_failovers",
    "Encode calls retried on another replica after theirs failed before replying.",
)

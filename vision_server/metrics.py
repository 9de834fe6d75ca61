"""Prometheus series of the vision service (served on ``--metrics-port``), named like vLLM's."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

requests = Counter(
    "dvd:vision_requests",
    "Encode calls, by outcome (gRPC status code name).",
    ["status"],
)
images = Counter(
    "dvd:vision_images",
    "Images served, embedding cache hits included (misses are the images encoded).",
)
videos = Counter("dvd:vision_videos", "Videos encoded.")
video_frames = Counter("dvd:vision_video_frames", "Video frames sampled and encoded (a tile each).")
tiles = Counter(
    "dvd:vision_tiles",
    "Tiles of the images served, by Visual Resolution Router decision (keep: 256 tokens, "
    "compress: 64).",
    ["route"],
)
visual_tokens = Counter("dvd:vision_visual_tokens", "Visual tokens produced (embedding rows sent).")
tokens_saved = Counter(
    "dvd:vision_tokens_saved",
    "Visual tokens removed by the router (256 - 64 for every compressed tile).",
)
embedding_bytes = Counter(
    "dvd:vision_embedding_bytes",
    "Embedding bytes sent to clients, by transport (grpc: streamed; shared_memory: written "
    "into the client's segment on this host).",
    ["transport"],
)
queue_wait = Histogram(
    "dvd:vision_queue_wait_seconds",
    "Time an image's tiles waited for their first forward pass.",
    buckets=_LATENCY_BUCKETS,
)
request_seconds = Histogram(
    "dvd:vision_request_seconds",
    "Encode call duration, from request to last embedding byte.",
    buckets=_LATENCY_BUCKETS,
)
batch_seconds = Histogram(
    "dvd:vision_batch_seconds", "Duration of one ViT forward pass.", buckets=_LATENCY_BUCKETS
)
device_busy_seconds = Counter(
    "dvd:vision_device_busy_seconds",
    "Time the encoder's forward passes computed (on CUDA, measured on the device with events). "
    "Its rate is the fraction of time the device was busy encoding.",
)
batch_tiles = Histogram(
    "dvd:vision_batch_tiles",
    "Tiles in one ViT forward pass.",
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256),
)
queued_tiles = Gauge("dvd:vision_queued_tiles", "Tiles waiting for a forward pass.")
embedding_cache_hits = Counter(
    "dvd:vision_embedding_cache_hits",
    "Images whose rows came from the embedding cache (not encoded again).",
)
embedding_cache_misses = Counter(
    "dvd:vision_embedding_cache_misses",
    "Images encoded while the embedding cache is on (each is then kept, within the bound).",
)
embedding_cache_evictions = Counter(
    "dvd:vision_embedding_cache_evictions",
    "Images dropped from the embedding cache to stay within --embedding-cache-mb.",
)
embedding_cache_bytes = Gauge(
    "dvd:vision_embedding_cache_bytes", "Bytes of embedding rows held by the embedding cache."
)
embedding_cache_entries = Gauge(
    "dvd:vision_embedding_cache_entries", "Images held by the embedding cache."
)

media_worker_restarts = Counter(
    "dvd:vision_media_worker_restarts",
    "Media worker processes replaced, by reason (crashed: a signal or an exit while decoding; "
    "cpu_limit, timeout: a limit of one item; protocol: an answer out of protocol; cancelled: "
    "not stopped in time after its call was cancelled; recycled: its address space stayed "
    "large after an item; start: could not start).",
    ["reason"],
)
media_worker_cpu_seconds = Counter(
    "dvd:vision_media_worker_cpu_seconds",
    "CPU time the media worker processes spent on the items they finished (decoding and "
    "tiling; not counted in process_cpu_seconds_total, which is the server's own).",
)


def observe_pass(num_tiles: int, seconds: float) -> None:
    batch_tiles.observe(num_tiles)
    batch_seconds.observe(seconds)


def observe_routing(
    tokens_per_tile: Sequence[int], full_tokens: int, compressed_tokens: int
) -> None:
    """The router's decisions on one image's tiles (a tile with fewer than ``full_tokens``
    was compressed to ``compressed_tokens``), whether just encoded or from the cache."""
    compressed = sum(1 for tokens in tokens_per_tile if tokens < full_tokens)
    tiles.labels(route="keep").inc(len(tokens_per_tile) - compressed)
    tiles.labels(route="compress").inc(compressed)
    tokens_saved.inc(compressed * (full_tokens - compressed_tokens))

"""Settings of the vision service: command-line flags and ``DVD_*`` variables, one model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from checkpoints.settings import CheckpointSettings
from vision_server.invariance import BatchInvariance


class VisionSettings(CheckpointSettings):
    """DvD vision service: the InternVL image encoder over gRPC. Every flag is also a ``DVD_*``
    environment variable (flags win)."""

    model_name: str | None = Field(
        None,
        description="model id reported to clients (default: --model, or the tiny model's name)",
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(
        50051, ge=0, le=65535, description="gRPC port (0: a free one, chosen when it binds)"
    )
    metrics_port: int = Field(
        9400,
        ge=0,
        le=65535,
        description="HTTP port of the Prometheus /metrics page (0: a free one, chosen when it "
        "binds)",
    )
    metrics: bool = Field(
        True, description="serve the Prometheus /metrics page (--no-metrics: no metrics port)"
    )
    port_file: str | None = Field(
        None,
        description="once serving, write the ports it bound to this file as one JSON object "
        '({"host", "port", "metrics_port", "pid"}; metrics_port null without metrics), '
        "replaced whole, removed at a clean exit",
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute and wire dtype (auto: bfloat16 on CUDA, float32 on CPU)"
    )
    max_batch_tiles: int = Field(
        32, ge=1, description="most tiles in one ViT forward pass, across requests"
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="how long tiles wait for more to share a pass while the device is busy "
        "(an idle device starts a pass at once)",
    )
    passes_in_flight: int = Field(
        2,
        ge=1,
        description="forward passes queued on the device at once: one computing, the others "
        "staged behind it, so the device does not wait while the host launches the next",
    )
    max_queued_tiles: int = Field(
        2048,
        ge=1,
        description="tiles waiting to be encoded before new requests are refused (at least "
        "--max-tiles-limit + 1: the largest image must fit in an empty queue)",
    )
    max_queued_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description="bytes of tiles (uint8 pixels) waiting to be encoded before new requests "
        "are refused",
    )
    max_images_per_request: int = Field(16, ge=1, description="images in one Encode call")
    max_tiles_limit: int = Field(
        40, ge=1, description="largest per-image max_tiles a request may ask for"
    )
    max_tiles_per_request: int = Field(
        256, ge=1, description="tiles of all images of one request, thumbnails included"
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="encoded size of one image")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="width x height of one image, checked before decoding"
    )
    max_videos_per_request: int = Field(4, ge=0, description="videos in one Encode call")
    max_video_bytes: int = Field(32 * 1024 * 1024, ge=1, description="encoded size of one video")
    max_video_pixels: int = Field(
        3840 * 2160, ge=1, description="width x height of a video's frames, checked before decoding"
    )
    max_video_duration_s: float = Field(
        600.0, gt=0, description="length of one video, checked before decoding"
    )
    max_video_decoded_frames: int = Field(
        36_000,
        ge=1,
        description="frames in one video (decoding cost), counted from its packets before decoding",
    )
    max_video_decoded_pixels: int = Field(
        20_000_000_000,
        ge=1,
        description="pixels decoded for one video (width x height summed over every frame "
        "decoded, sampled or not), counted as frames are decoded",
    )
    max_video_decode_s: float = Field(
        60.0,
        gt=0,
        description="wall time to check and decode one video, from opening it to its last "
        "sampled frame, checked as frames are decoded",
    )
    num_frames: int | None = Field(
        None,
        ge=1,
        description="frames sampled per video when a call gives none (unset: the "
        "checkpoint's, or 8)",
    )
    max_num_frames: int = Field(64, ge=1, description="most frames a call may sample per video")
    preprocess_workers: int | None = Field(
        None,
        ge=1,
        description="media worker processes decoding and tiling images and videos, one item "
        "at a time each; videos take at most all but one (unset: one per CPU this process may "
        "use, its cgroup's CPU quota included, from 2 to 32)",
    )
    media_worker_memory_mb: int = Field(
        2048,
        ge=512,
        description="address space of one media worker process (RLIMIT_AS); an image or "
        "video whose decoding needs more fails alone, with a 400",
    )
    media_item_cpu_s: int = Field(
        120,
        ge=1,
        description="CPU seconds a media worker may spend on one image or video (RLIMIT_CPU); "
        "past them it is killed and replaced, and the item fails",
    )
    media_item_timeout_s: float = Field(
        90.0,
        gt=0,
        description="wall time a media worker may spend on one image or video; past it, it is "
        "killed and replaced, and the item fails (a video's --max-video-decode-s comes first)",
    )
    overlap_preparation: Literal["auto", "on", "off"] = Field(
        "auto",
        description="while the encoder is idle, cut an image's grid tiles and its thumbnail "
        "on two threads after decoding and encode each part as soon as it is cut, so a lone "
        "image's grid is encoded while its thumbnail is resized; under load each image is "
        "prepared in one piece (auto: on with CUDA; on the CPU the encoder needs the cores "
        "the second thread would take)",
    )
    batch_invariant: BatchInvariance = Field(
        "auto",
        description="compute every pass in chunks of one fixed shape, so that a tile's rows "
        "and router decision are the same bits whatever shares its pass (CPU: one tile per "
        "chunk; CUDA: 8 tiles, padded, cuBLAS split-K off); auto: on for the CPU, off for CUDA",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads (0: torch's default on CPU, 2 on CUDA, where the "
        "host only gathers tiles and more threads spin against decoding)",
    )
    chunk_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, le=4 * 1024 * 1024, description="embedding bytes per message"
    )
    cuda_graphs: bool = Field(
        True,
        description="on CUDA, replay the encoder from CUDA graphs captured at start-up for "
        "passes of 1 to 8 tiles and every multiple of 4 up to --max-batch-tiles (one launch "
        "instead of hundreds); --no-cuda-graphs runs every pass eagerly",
    )
    shared_memory: bool = Field(
        True,
        description="write embeddings into a client's shared memory when the client runs on "
        "this host (and offers it); otherwise, and with --no-shared-memory, stream them",
    )
    embedding_cache_mb: int = Field(
        1024,
        ge=0,
        description="memory for the embedding cache: the rows sent for recent images, keyed "
        "by content, tiling, router mode, visual-token budget and checkpoint, served again "
        "without encoding (least recently used first out; 0: off)",
    )
    max_message_bytes: int = Field(
        128 * 1024 * 1024, ge=1024 * 1024, description="largest gRPC request accepted"
    )
    max_connection_age_ms: int = Field(
        30_000,
        ge=0,
        description="close each client connection after this long (give or take 10%), "
        "so that clients look the service name up again and spread calls over new replicas "
        "(0: never)",
    )
    max_connection_age_grace_ms: int = Field(
        120_000,
        ge=0,
        description="how long calls on a connection past its age may still run before it is closed",
    )
    cache_dir: str | None = Field(
        None, description="where the tiny checkpoint is generated (default: ~/.cache/dvd)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _queue_holds_the_largest_image(self) -> VisionSettings:
        """An image of ``max_tiles_limit`` tiles and its thumbnail must fit in an empty queue:
        otherwise it is refused as "retry later" by an idle service, forever."""
        if self.max_queued_tiles < self.max_tiles_limit + 1:
            raise ValueError(
                f"max_queued_tiles ({self.max_queued_tiles}) must hold the largest image: "
                f"max_tiles_limit + 1 = {self.max_tiles_limit + 1} tiles"
            )
        return self

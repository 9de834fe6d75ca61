"""Settings of the language service: command-line flags and ``DVD_*`` variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from checkpoints.settings import CheckpointSettings
from llm_server.api.completion_protocol import PROMPTS_CAP
from llm_server.api.protocol import (
    ITEMS_PER_MESSAGE_CAP,
    LOGIT_BIAS_CAP,
    MESSAGES_CAP,
    STOP_SEQUENCES_CAP,
    TOOLS_CAP,
)

# Connections and requests in progress that --max-connections allows, when unset, beyond
# --max-concurrent-requests: room for health checks, /metrics, 429s and clients' idle
# keep-alive connections.
CONNECTION_HEADROOM = 256

# How embeddings come back from the vision service (--embedding-transport): ``auto`` writes
# them into this host's shared memory once the vision service proves it sees it.
EmbeddingTransport = Literal["auto", "grpc", "shared-memory"]
VisionBalancing = Literal["affinity", "round_robin"]


class LLMSettings(CheckpointSettings):
    """DvD language service: the OpenAI-compatible API on vLLM. Every flag is also a ``DVD_*``
    environment variable (flags win)."""

    served_model_name: str | None = Field(
        None, description="model id in the API (default: --model, or the tiny model's name)"
    )
    cache_dir: str | None = Field(
        None, description="DvD's cache: tiny checkpoint, language-model config views"
    )

    # ---- HTTP ----
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(
        8000, ge=0, le=65535, description="HTTP port (0: a free one, chosen when it binds)"
    )
    port_file: str | None = Field(
        None,
        description="once serving, write the port it bound to this file as one JSON object "
        '({"host", "port", "pid"}), replaced whole, removed at a clean exit',
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="open HTTP connections (or requests in progress) beyond which a new "
        "request gets a 503 at once rather than a queue (uvicorn's limit_concurrency); must "
        f"be above --max-concurrent-requests (unset: it plus {CONNECTION_HEADROOM})",
    )
    header_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="deadline for a request's line and headers, from the connection's opening "
        "or the first byte of its next request; past it the connection is closed (a 408 if "
        "part of a request had come)",
    )
    request_read_timeout_s: float = Field(
        60.0,
        gt=0,
        description="deadline for a request's body, from the end of its headers; past it a "
        "408 and the connection is closed",
    )
    max_header_bytes: int = Field(
        16384,
        ge=1024,
        description="size of a request's line and headers; beyond it a 431 (a 400 and the "
        "connection closed when the parser meets it before they are all in)",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="serve /v1 without --api-key on an address other than loopback (without "
        "this flag the service refuses to start there)",
    )

    # ---- vision ----
    vision: Literal["grpc", "inprocess"] = Field(
        "grpc",
        description="grpc: the vision service (DvD); inprocess: encode images in this process "
        "before prefill (the coupled baseline, single-process deployment)",
    )
    vision_device: str = Field(
        "auto", description="torch device of the in-process encoder (--vision inprocess)"
    )
    vision_max_batch_tiles: int = Field(
        32,
        ge=1,
        description="most tiles in one forward pass of the in-process encoder (--vision "
        "inprocess); on a GPU shared with vLLM its memory comes out of "
        "--gpu-memory-utilization",
    )
    vision_target: str = Field(
        "127.0.0.1:50051",
        description="gRPC target of the vision service: host:port, dns:///name:port (every "
        "address the name resolves to is a replica, looked up again every 5 s), a static list "
        "ipv4:10.0.0.1:50051,10.0.0.2:50051, or a comma list of host:port",
    )
    vision_timeout_s: float = Field(
        120.0, gt=0, description="deadline of one Encode call (all images of a request)"
    )
    max_tiles: int | None = Field(
        None, ge=1, description="default max tiles per image (unset: the checkpoint's)"
    )
    embedding_transport: EmbeddingTransport = Field(
        "auto",
        description="how embeddings come back: auto (shared memory when the vision service is "
        "on this host, else streamed), grpc (always streamed), shared-memory (required)",
    )
    shared_memory_mb: int = Field(
        256,
        ge=1,
        description="shared memory (/dev/shm, reserved once a vision service has proven it "
        "shares this host, by reading back a probe) for embeddings; each call takes room for "
        "its rows (its images' tiles, counted from their headers, x 256 x the LLM width x 2 "
        "bytes in bfloat16) and calls that find it full stream instead",
    )
    vision_channels: int = Field(
        1, ge=1, le=64, description="gRPC connections to each vision replica (for large transfers)"
    )
    vision_balancing: VisionBalancing = Field(
        "affinity",
        description="how Encode calls are spread over the vision replicas behind "
        "--vision-target: affinity (a consistent hash of each call's images, so repeated images "
        "reach the replica that cached them, within a load bound; failover to another replica) "
        "or round_robin (gRPC's, by call count)",
    )
    vision_load_bound: float = Field(
        1.25,
        ge=1.0,
        le=100.0,
        description="affinity: a replica takes a call while its tiles in flight, the call's "
        "included, stay within this many times the fleet's mean; past it the call goes to the "
        "next replica on the ring",
    )

    # ---- language engine (vLLM) ----
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="LLM dtype (auto: the checkpoint's)"
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context length (unset: the model's)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallelism")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of GPU memory vLLM may use"
    )
    max_num_seqs: int | None = Field(None, ge=1, description="most sequences vLLM runs at once")
    enforce_eager: bool = Field(
        False, description="skip CUDA graphs / compilation (faster start, slower decode)"
    )
    cpu_kv_cache_gib: float = Field(
        1.0,
        gt=0,
        description="KV-cache size on CPU (GiB; VLLM_CPU_KVCACHE_SPACE, when set, wins)",
    )
    seed: int = Field(0, description="engine seed")
    prefix_caching: bool = Field(
        True,
        description="reuse the KV blocks of prompt prefixes vLLM has already computed (image "
        "rows included: vLLM hashes them by content), e.g. the history of a chat",
    )
    tool_parser: str = Field(
        "auto",
        description="vLLM tool-call parser, which reads tool calls from answers (auto: the "
        "backbone's, openai for GPT-OSS's harmony messages, hermes for the tool_call JSON "
        "blocks of Qwen3 backbones)",
    )

    # ---- request limits ----
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest HTTP request body (images included)"
    )
    max_json_items: int = Field(
        65_536,
        ge=1,
        description="commas, objects, arrays and escapes in one request body, counted as it "
        "arrives, before it is parsed (parsing and validation hold the event loop and cost "
        "most for many tiny values and for escapes)",
    )
    max_concurrent_requests: int = Field(
        256, ge=1, description="chat requests served at once; beyond it requests get a 429"
    )
    max_images_per_request: int = Field(16, ge=0, description="images in one request")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="encoded size of one image")
    max_videos_per_request: int = Field(4, ge=0, description="videos in one request")
    max_video_bytes: int = Field(32 * 1024 * 1024, ge=1, description="encoded size of one video")
    num_frames: int | None = Field(
        None,
        ge=1,
        description="frames sampled per video when a request gives no num_frames (unset: the "
        "checkpoint's, or 8)",
    )
    max_num_frames: int = Field(
        64, ge=1, description="largest num_frames a request may ask for (per video)"
    )
    max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    max_prompts: int = Field(
        64,
        ge=1,
        le=PROMPTS_CAP,
        description="prompts in one /v1/completions request (each is generated n times)",
    )
    max_tiles_limit: int = Field(
        40,
        ge=1,
        description="largest per-image max_tiles a request may ask for (the vision service's "
        "own --max-tiles-limit, which it reports when it connects, applies too)",
    )
    max_messages: int = Field(2048, ge=1, le=MESSAGES_CAP, description="messages in one request")
    max_content_parts: int = Field(
        256,
        ge=1,
        le=ITEMS_PER_MESSAGE_CAP,
        description="content parts (text, image, video) or tool calls in one message",
    )
    max_text_chars: int = Field(
        1_000_000,
        ge=1,
        description="characters of text in one request: the messages' text, names and tool "
        "calls, and the tools' descriptions",
    )
    max_tools: int = Field(128, ge=0, le=TOOLS_CAP, description="tools in one request")
    max_schema_chars: int = Field(
        262144,
        ge=2,
        description="characters of a request's JSON schemas together (compact JSON): its "
        "tools' parameters and response_format's schema",
    )
    max_stop_sequences: int = Field(
        16, ge=0, le=STOP_SEQUENCES_CAP, description="stop sequences in one request"
    )
    max_stop_chars: int = Field(256, ge=1, description="characters of one stop sequence")
    max_logit_bias: int = Field(
        1024, ge=0, le=LOGIT_BIAS_CAP, description="entries in one request's logit_bias"
    )
    max_top_logprobs: int = Field(
        20, ge=0, le=20, description="largest top_logprobs (OpenAI's range is 0-20)"
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="largest max_tokens a request may ask for (unset: the context)"
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="max_tokens when a request gives none (unset: the rest of the context)",
    )
    allowed_image_hosts: list[str] = Field(
        default_factory=list,
        description="hosts from which http(s) image and video URLs may be fetched (exact names, "
        "or '.example.com' for subdomains); empty: only data: URLs",
    )
    allowed_image_networks: list[str] = Field(
        default_factory=list,
        description="private networks (CIDR) that allow-listed hosts may resolve to; any other "
        "private, loopback, link-local or metadata address is refused",
    )
    image_fetch_timeout_s: float = Field(
        10.0, gt=0, description="timeout of one image (or video) download"
    )

    # ---- /v1/responses ----
    response_store_mb: int = Field(
        256,
        ge=0,
        description="memory for stored responses (store=true), which previous_response_id "
        "continues: each holds its whole conversation, images as sent; the oldest go first "
        "(0: nothing is stored)",
    )
    response_store_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="how long a stored response can be continued or read back; later its id "
        "is a 404",
    )

    # ---- security and lifecycle ----
    api_key: SecretStr | None = Field(
        None,
        description="if set, /v1/*, /tokenize and /detokenize require 'Authorization: Bearer "
        "<key>' (/health and /metrics stay open)",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="after SIGTERM, how long in-flight requests may run to completion"
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _check_connections(self) -> LLMSettings:
        if (
            self.max_connections is not None
            and self.max_connections <= self.max_concurrent_requests
        ):
            raise ValueError(
                f"--max-connections ({self.max_connections}) must be above "
                f"--max-concurrent-requests ({self.max_concurrent_requests}), or refused "
                "requests would get a 503 instead of a 429 and health checks none"
            )
        return self

    @property
    def connection_limit(self) -> int:
        """Connections or requests in progress beyond which uvicorn answers 503."""
        if self.max_connections is not None:
            return self.max_connections
        return self.max_concurrent_requests + CONNECTION_HEADROOM

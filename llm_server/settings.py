"""Settings of the language service: command-line flags and ``DVD_*`` variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from checkpoints.settings import CheckpointSettings


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
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")

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
        description="gRPC target of the vision service: host:port, or dns:///name:port to "
        "spread requests over every address the name resolves to",
    )
    vision_timeout_s: float = Field(
        120.0, gt=0, description="deadline of one Encode call (all images of a request)"
    )
    max_tiles: int | None = Field(
        None, ge=1, description="default max tiles per image (unset: the checkpoint's)"
    )
    embedding_transport: Literal["auto", "grpc", "shared-memory"] = Field(
        "auto",
        description="how embeddings come back: auto (shared memory when the vision service is "
        "on this host, else streamed), grpc (always streamed), shared-memory (required)",
    )
    shared_memory_mb: int = Field(
        256,
        ge=1,
        description="shared memory (/dev/shm, reserved up front) for embeddings from a vision "
        "service on this host; each call takes room for its rows (its images' tiles, counted "
        "from their headers, x 256 x the LLM width x 2 bytes in bfloat16) and calls that find "
        "it full stream instead",
    )
    vision_channels: int = Field(
        1, ge=1, le=64, description="gRPC connections to each vision replica (for large transfers)"
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
    cpu_kv_cache_gib: int = Field(
        1, ge=1, description="KV-cache size on CPU (GiB; sets VLLM_CPU_KVCACHE_SPACE)"
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

    # ---- security and lifecycle ----
    api_key: SecretStr | None = Field(
        None,
        description="if set, /v1/* requires 'Authorization: Bearer <key>' "
        "(/health and /metrics stay open)",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="after SIGTERM, how long in-flight requests may run to completion"
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

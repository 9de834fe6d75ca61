"""The FastAPI application: wires settings, the language engine and the image encoder."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from checkpoints.default import default_cache_dir, resolve_model
from checkpoints.identity import checkpoint_digest, short_digest
from checkpoints.spec import load_checkpoint_spec
from llm_server import tracing
from llm_server.api.admission import Admission
from llm_server.api.completions import CompletionService
from llm_server.api.middleware import (
    AdmissionGateMiddleware,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    RequestMetricsMiddleware,
    ServerTimingMiddleware,
)
from llm_server.api.response_store import ResponseStore
from llm_server.api.responses import ResponsesService
from llm_server.api.routes import install_error_handlers, ops_router, router
from llm_server.api.serving import ChatService
from llm_server.engine.language_model import LanguageEngine
from llm_server.executor import default_executor_workers, install_default_executor
from llm_server.images import ImageFetchPolicy, MediaLoader
from llm_server.prompt import PromptBuilder
from llm_server.settings import LLMSettings
from llm_server.vision.base import VisualEncoder
from llm_server.vision.grpc_client import GrpcVisualEncoder
from llm_server.vision.inprocess import InProcessVisualEncoder, shares_llm_gpu

logger = logging.getLogger("llm_server")

# The routes that generate: each request holds an admission slot (checked early, too).
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


async def build_chat_service(
    settings: LLMSettings, engine_args: Mapping[str, Any] | None = None
) -> ChatService:
    """Load the checkpoint description, start vLLM (with ``engine_args``: the vLLM engine
    arguments of the command line) and connect to the vision service."""
    from transformers import AutoTokenizer

    if settings.vision == "grpc":
        # This process only copies embedding rows around; the model runs in vLLM's own
        # processes. One intra-op thread keeps torch from starting an OpenMP team for every
        # executor thread that copies rows (they would compete with vLLM for the cores).
        import torch

        torch.set_num_threads(1)
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    path, model_id = resolve_model(settings.model, settings.revision, cache_dir)
    spec = load_checkpoint_spec(path)
    model_name = settings.served_model_name or model_id
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompts = PromptBuilder(tokenizer, spec.image_tokens)
    encoder: VisualEncoder | None = None
    encoder_max_tiles: Callable[[], int | None] | None = None
    utilization = settings.gpu_memory_utilization
    llm_gpus = (
        settings.tensor_parallel_size
        * settings.pipeline_parallel_size
        * int((engine_args or {}).get("data_parallel_size", 1))
    )
    if settings.vision == "inprocess" and shares_llm_gpu(settings.vision_device, llm_gpus):
        # The ViT first, at its peak, so that vLLM sizes its KV cache around it.
        coupled = await InProcessVisualEncoder.start(
            path, cache_dir, settings.vision_device, settings.vision_max_batch_tiles
        )
        utilization = coupled.gpu_share(path, utilization).llm_utilization()
        encoder, encoder_max_tiles = coupled, lambda: coupled.max_tiles_limit
    engine = LanguageEngine.start(
        spec,
        settings,
        model_name,
        cache_dir,
        gpu_memory_utilization=utilization,
        engine_args=engine_args,
    )
    if encoder is None and settings.vision == "inprocess":
        # After vLLM on CPU: its engine process is forked before this process runs OpenMP.
        local = await InProcessVisualEncoder.start(
            path, cache_dir, settings.vision_device, settings.vision_max_batch_tiles
        )
        encoder, encoder_max_tiles = local, lambda: local.max_tiles_limit
    elif encoder is None:
        digest = await asyncio.to_thread(checkpoint_digest, path)
        logger.info("checkpoint %s: the vision service must serve the same", short_digest(digest))
        remote = GrpcVisualEncoder(
            settings.vision_target,
            timeout_s=settings.vision_timeout_s,
            expected_hidden_size=engine.hidden_size,
            expected_checkpoint_digest=digest,
            channels=settings.vision_channels,
            balancing=settings.vision_balancing,
            load_bound=settings.vision_load_bound,
            transport=settings.embedding_transport,
            shared_memory_bytes=settings.shared_memory_mb * 1024 * 1024,
        )
        remote.start()
        encoder, encoder_max_tiles = remote, lambda: reported_max_tiles(remote)
    images = MediaLoader(
        ImageFetchPolicy(
            max_bytes=settings.max_image_bytes,
            allowed_hosts=frozenset(settings.allowed_image_hosts),
            timeout_s=settings.image_fetch_timeout_s,
            allowed_networks=ImageFetchPolicy.networks(settings.allowed_image_networks),
        ),
        max_video_bytes=settings.max_video_bytes,
    )
    logger.info(
        "chat template: %s content, image marker %r; vision: %s",
        prompts.content_format.value,
        prompts.marker,
        "in this process" if settings.vision == "inprocess" else settings.vision_target,
    )
    return ChatService(
        engine,
        encoder,
        prompts,
        images,
        settings,
        default_num_frames=spec.video_frames,
        encoder_max_tiles=encoder_max_tiles,
    )


def reported_max_tiles(remote: GrpcVisualEncoder) -> int | None:
    """The vision service's per-image tile limit, from its ModelInfo; None before it has
    answered (or when it does not say: 0 on the wire)."""
    return (remote.info.max_tiles_limit or None) if remote.info is not None else None


# How often the engine's liveness is checked, and how long a dead engine's server keeps
# answering 503 (in-flight requests get theirs, health checks see it) before it stops.
ENGINE_CHECK_INTERVAL_S = 0.5
ENGINE_DEATH_GRACE_S = 1.0


def freeze_startup_heap() -> None:
    """Move everything start-up allocated (vLLM, transformers, torch, the tokenizer: millions
    of objects) out of the garbage collector's sight, as ``vllm serve`` does: a collection of
    the oldest generation otherwise walks all of it, on the event loop, whenever requests
    have allocated enough to trigger one (steps of 0.8-1.6 s were seen)."""
    gc.collect()
    gc.freeze()


async def watch_engine(engine: LanguageEngine, on_fatal: Callable[[str], None] | None) -> None:
    """Wait until vLLM's engine process has died, then report it once through ``on_fatal``
    (the server stops and exits non-zero, so that its supervisor restarts it)."""
    # vLLM sets the flag from its own monitor thread; there is no event to await.
    while not engine.errored:  # noqa: ASYNC110
        await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
    reason = "the language engine (vLLM's engine core process) has died"
    logger.error("%s: answering 503 and stopping", reason)
    await asyncio.sleep(ENGINE_DEATH_GRACE_S)
    if on_fatal is not None:
        on_fatal(reason)


def create_app(
    settings: LLMSettings,
    on_fatal: Callable[[str], None] | None = None,
    engine_args: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The language service's ASGI app. ``on_fatal(reason)`` is called if the service cannot
    go on (its engine died); the caller should stop serving and exit non-zero.
    ``engine_args``: vLLM engine arguments given on the command line."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await install_default_executor(default_executor_workers())
        chat = await build_chat_service(settings, engine_args)
        app.state.chat = chat
        app.state.completions = CompletionService(chat)
        store_bytes = settings.response_store_mb * 1024 * 1024
        store = ResponseStore(store_bytes, settings.response_store_ttl_s)
        app.state.responses = ResponsesService(chat, store)
        watchdog = asyncio.create_task(watch_engine(chat.engine, on_fatal))
        freeze_startup_heap()
        try:
            yield
        finally:
            watchdog.cancel()
            app.state.chat = app.state.completions = app.state.responses = None
            await chat.encoder.close()
            await chat.images.close()
            chat.engine.shutdown()
            tracing.shutdown()

    app = FastAPI(title="DvD language service", version="0.1.0", lifespan=lifespan)
    app.state.api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.include_router(router)
    app.include_router(ops_router)
    install_error_handlers(app)

    def admission() -> Admission | None:
        chat: ChatService | None = getattr(app.state, "chat", None)
        return chat.admission if chat is not None else None

    # Outermost last: the headers' size first, then the admission gate (before the body is
    # read), the body limit reads it (size and deadline), the metrics count what routes answer.
    app.add_middleware(RequestMetricsMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        read_timeout_s=settings.request_read_timeout_s,
        max_json_items=settings.max_json_items,
    )
    app.add_middleware(AdmissionGateMiddleware, admission=admission, paths=GENERATION_PATHS)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=settings.max_header_bytes)
    # Outermost: every response, refusals included, carries its Server-Timing (and span).
    app.add_middleware(ServerTimingMiddleware)
    return app

"""`dvd-vision-server`: load the encoder and serve it over gRPC (with gRPC health checks)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from checkpoints.default import resolve_model
from checkpoints.identity import checkpoint_digest, short_digest
from checkpoints.spec import load_checkpoint_spec
from vision_server import tracing
from vision_server.data_path import compute_dtype_for_device, resolve_device
from vision_server.embedding_cache import EmbeddingCache
from vision_server.engine import EncoderEngine
from vision_server.invariance import chunk_tiles, use_deterministic_cuda_kernels
from vision_server.model.encoder import VisionEncoder
from vision_server.pipeline import VisionPipeline
from vision_server.service import SERVICE_NAME, VisionServicer, add_vision_service
from vision_server.settings import VisionSettings
from vision_server.threads import started_pool

logger = logging.getLogger("vision_server")

SHUTDOWN_GRACE_S = 10.0
# torch's intra-op threads on a CUDA host. The host side of a pass is one gather of uint8 tiles;
# torch's default (a thread per core) keeps OpenMP workers spinning against the threads that
# decode and tile images. On an H100 host with 16 cores, 2 threads took served throughput at
# 64 concurrent calls from 0.88 to 0.93 of the raw encoder's, and at 16 from 0.72 to 0.89.
CUDA_HOST_TORCH_THREADS = 2
# Exit status after the engine failed for good: non-zero, so that an orchestrator restarts us.
ENGINE_FAILED_EXIT_CODE = 1


@dataclass
class RunningServer:
    server: grpc.aio.Server
    servicer: VisionServicer
    engine: EncoderEngine
    health: health.aio.HealthServicer
    port: int
    metrics_port: int | None  # None: no metrics page
    engine_failed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_engine_failure(self, cause: BaseException) -> None:
        """On the event loop, once: NOT_SERVING at once (calls were already failed by the
        engine), then ``serve`` stops the server and the process exits non-zero."""
        logger.critical("vision engine failed (%r): reporting NOT_SERVING and exiting", cause)
        for name in ("", SERVICE_NAME):
            # set() only updates a dict and notifies watchers: it completes without waiting.
            asyncio.get_running_loop().create_task(
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            )
        self.engine_failed.set()

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Report NOT_SERVING, let in-flight calls finish (up to ``grace``), then stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.engine.stop()
        self.servicer.close()


def build_pipeline(settings: VisionSettings) -> tuple[VisionPipeline, str]:
    """Load the checkpoint's vision half and wrap it in a ready pipeline (blocking)."""
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else None
    path, model_id = resolve_model(settings.model, settings.revision, cache_dir)
    model_id = settings.model_name or model_id
    spec = load_checkpoint_spec(path)
    device = resolve_device(settings.device)
    dtype = compute_dtype_for_device(settings.dtype, device)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    chunk = chunk_tiles(settings.batch_invariant, device)
    if chunk and device.type == "cuda":
        use_deterministic_cuda_kernels()
    encoder = VisionEncoder.from_checkpoint(spec, device, dtype)
    engine = EncoderEngine(
        encoder,
        device,
        dtype,
        max_batch_tiles=settings.max_batch_tiles,
        max_wait_ms=settings.max_wait_ms,
        passes_in_flight=settings.passes_in_flight,
        max_queued_tiles=settings.max_queued_tiles,
        max_queued_bytes=settings.max_queued_bytes,
        invariant_chunk_tiles=chunk,
    )
    if settings.cuda_graphs:
        engine.capture_cuda_graphs()
    engine.warmup()
    digest = checkpoint_digest(path)
    logger.info(
        "loaded %s (%s layout%s, checkpoint %s) on %s as %s%s%s: ViT %dx%d, %d tokens/tile, "
        "LLM width %d",
        model_id,
        spec.layout.value,
        ", Flash: Visual Resolution Router on" if spec.flash else "",
        short_digest(digest),
        device,
        str(dtype).removeprefix("torch."),
        ", CUDA graphs" if engine.cuda_graphs else "",
        f", batch-invariant in chunks of {chunk} tiles" if chunk else "",
        spec.vision.num_layers,
        spec.vision.hidden_size,
        spec.tokens_per_tile,
        spec.llm_hidden_size,
    )
    cache = None
    if settings.embedding_cache_mb:
        cache = EmbeddingCache(settings.embedding_cache_mb * 1024 * 1024)
        logger.info("embedding cache: up to %d MiB of rows", settings.embedding_cache_mb)
    pipeline = VisionPipeline(engine, spec, settings, checkpoint_digest=digest, cache=cache)
    return pipeline, model_id


async def start_server(settings: VisionSettings) -> RunningServer:
    """Load the model and start serving; returns once the port is open and healthy."""
    # ``asyncio.to_thread`` work (loading, shared-memory writes) on a pool of fixed size.
    asyncio.get_running_loop().set_default_executor(started_pool(4, "vision-io"))
    if not settings.torch_threads and resolve_device(settings.device).type == "cuda":
        torch.set_num_threads(CUDA_HOST_TORCH_THREADS)
    pipeline, model_id = await asyncio.to_thread(build_pipeline, settings)
    engine, servicer = pipeline.engine, VisionServicer(pipeline, model_id)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", 8 * 1024 * 1024),
            # Clients keep a connection until it breaks and look the name up again only then:
            # ending each one after a while (its calls may finish) lets them find new replicas.
            *(
                [
                    ("grpc.max_connection_age_ms", settings.max_connection_age_ms),
                    ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms),
                ]
                if settings.max_connection_age_ms
                else []
            ),
        ]
    )
    add_vision_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # IPv6 literal
    # Port 0 binds a free port: the ones bound are reported (log line, --port-file), so that
    # nothing has to pick a port ahead of the server and race it for the bind.
    port = server.add_insecure_port(f"{host}:{settings.port}")
    metrics_port = None
    if settings.metrics:
        metrics_http, _ = start_http_server(settings.metrics_port, addr=settings.host)
        metrics_port = int(metrics_http.server_port)
    running = RunningServer(server, servicer, engine, health_servicer, port, metrics_port)
    engine.set_fatal_handler(running.on_engine_failure)
    engine.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "vision service listening on %s:%d (%s)",
        settings.host,
        port,
        "no metrics" if metrics_port is None else f"metrics on :{metrics_port}",
    )
    if settings.port_file:
        write_port_file(
            Path(settings.port_file),
            {"host": settings.host, "port": port, "metrics_port": metrics_port, "pid": os.getpid()},
        )
    return running


def write_port_file(path: Path, ports: dict[str, object]) -> None:
    """Write ``ports`` to ``path`` as one JSON object, through a rename: a reader sees the
    whole file or none (of this start)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(ports) + "\n")
    partial.replace(path)


async def serve(settings: VisionSettings) -> int:
    """Serve until SIGINT/SIGTERM (exit status 0) or until the engine fails for good (1)."""
    port_file = Path(settings.port_file) if settings.port_file else None
    if port_file is not None:
        port_file.unlink(missing_ok=True)  # an earlier start's ports are not ours
    try:
        return await _serve(settings)
    finally:
        if port_file is not None:
            port_file.unlink(missing_ok=True)


async def _serve(settings: VisionSettings) -> int:
    running = await start_server(settings)
    # What start-up allocated (torch, the model, gRPC: hundreds of thousands of objects) is
    # moved out of the garbage collector's sight: a collection of the oldest generation would
    # otherwise walk all of it on the event loop (0.6-1 s) whenever requests trigger one.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    signalled = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(running.engine_failed.wait())
    await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    failed.cancel()
    if running.engine_failed.is_set():
        # Nothing in flight can succeed any more: no drain, just close the port and go.
        await running.stop(grace=0.5)
        logger.critical("vision service exiting after an engine failure")
        return ENGINE_FAILED_EXIT_CODE
    logger.info("shutting down: draining in-flight requests (up to %.0f s)", SHUTDOWN_GRACE_S)
    await running.stop()
    logger.info("vision service stopped")
    return 0


def main(argv: list[str] | None = None) -> None:
    settings = VisionSettings(  # type: ignore[call-arg]
        _cli_parse_args=sys.argv[1:] if argv is None else argv,
        _cli_prog_name="dvd-vision-server",
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    tracing.configure()  # from the standard OTEL_* variables; off unless they ask
    try:
        status = asyncio.run(serve(settings))
    finally:
        tracing.shutdown()  # what is still buffered goes out
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()

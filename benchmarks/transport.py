"""Embedding transport benchmark: how fast embeddings move from the vision service to the
language service, by transport (gRPC stream, same-host shared memory), size and concurrency.

    python -m benchmarks.transport [--sizes-mb 0.5 1.7 6.8 27.3] [--streams 1 16]
        [--clients 1] [--servers 1] [--channels 1] [--transports grpc shared-memory]

Stand-in vision servers (their own processes) answer every Encode call with a pre-computed
embedding tensor of the size asked for, through the vision service's own delivery code
(``vision_server.service.image_messages``); client processes receive them with the language
service's ``GrpcVisualEncoder``. No model runs, so the numbers are the transport's alone.

Per configuration it reports the aggregate GB/s over all concurrent calls, the GB/s of one
call, the latency of a call (p50/p99), and a plain memory copy of the same size for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from collections.abc import AsyncIterator
from queue import Empty
from typing import Any

import grpc
import torch

from llm_server.vision.grpc_client import GrpcVisualEncoder
from protos import shm
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc
from protos.messages import EncodeCall, ImageInput
from vision_server.delivery import SharedMemoryDelivery
from vision_server.service import add_vision_service, image_messages

HIDDEN = 1024  # InternVL3.5-1B's LLM width; sizes are set in MB, the row count follows
ROW_BYTES = HIDDEN * 2  # bfloat16


def rows_for(size_bytes: int) -> int:
    return max(1, size_bytes // ROW_BYTES)


class _StandInServicer(vision_pb2_grpc.VisionServiceServicer):
    """Answers every Encode call with one image of the byte size written in its data."""

    def __init__(self, chunk_bytes: int, max_rows: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.max_rows = max_rows
        self.writer = shm.SegmentWriter() if shm.available() else None
        self.tensors: dict[int, torch.Tensor] = {}

    def tensor(self, rows: int) -> torch.Tensor:
        if rows not in self.tensors:
            self.tensors[rows] = torch.randn(rows, HIDDEN).to(torch.bfloat16)
        return self.tensors[rows]

    async def Encode(  # noqa: N802
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        tensor = self.tensor(rows_for(int(request.images[0].data)))
        rows = int(tensor.shape[0])
        header = vision_pb2.EncodeResponse(
            header=vision_pb2.ImageHeader(
                image_index=0,
                num_tiles=1,
                tokens_per_tile=[rows],
                num_visual_tokens=rows,
                hidden_size=HIDDEN,
                dtype=vision_pb2.DTYPE_BFLOAT16,
                num_bytes=rows * ROW_BYTES,
                full_tokens_per_tile=rows,
            )
        )
        delivery = SharedMemoryDelivery.open(self.writer, request, request.request_id)
        async for message in image_messages(header, tensor, delivery, self.chunk_bytes):
            yield message

    async def GetModelInfo(  # noqa: N802
        self, request: vision_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.ModelInfo:
        return vision_pb2.ModelInfo(
            model_id="transport-stand-in",
            hidden_size=HIDDEN,
            dtype=vision_pb2.DTYPE_BFLOAT16,
            tokens_per_tile=self.max_rows,  # one "tile" per call, as large as the largest size
            default_max_tiles=1,
            use_thumbnail=False,
        )


def _serve(port: int, chunk_bytes: int, max_rows: int, bound: Any, torch_threads: int) -> None:
    """A stand-in server on ``port`` (0: a free one); puts the port bound on ``bound``."""
    if torch_threads:
        torch.set_num_threads(torch_threads)

    async def run() -> None:
        server = grpc.aio.server()
        servicer = _StandInServicer(chunk_bytes, max_rows)
        add_vision_service(servicer, server)  # type: ignore[arg-type]
        bound_port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        bound.put(bound_port)
        await server.wait_for_termination()

    asyncio.run(run())


async def _client(
    target: str,
    size_bytes: int,
    streams: int,
    calls: int,
    channels: int,
    transport: str,
    reserve_bytes: int,
) -> dict[str, Any]:
    """``streams`` concurrent callers, ``calls`` calls each; per-call seconds and wall time.
    ``reserve_bytes``: the shared memory one call reserves (the stand-in's largest image)."""
    encoder = GrpcVisualEncoder(
        target,
        timeout_s=120,
        expected_hidden_size=HIDDEN,
        channels=channels,
        transport=transport,  # type: ignore[arg-type]
        shared_memory_bytes=max(64 << 20, streams * (reserve_bytes + (1 << 20))),
    )
    image = [ImageInput(str(size_bytes).encode())]
    try:
        for _ in range(2):  # connect, check the model, warm the tensors
            await encoder.encode(EncodeCall(image, request_id="warm-up"))
        latencies: list[float] = []

        async def caller() -> None:
            for _ in range(calls):
                started = time.perf_counter()
                (result,) = (
                    await encoder.encode(EncodeCall(image, request_id="transport-bench"))
                ).images
                latencies.append(time.perf_counter() - started)
                assert result.embeddings.numel() == rows_for(size_bytes) * HIDDEN

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(streams)))
        wall = time.perf_counter() - started
    finally:
        await encoder.close()
    return {"latencies": latencies, "wall": wall, "started": started}


def _client_process(args: tuple[Any, ...], barrier: Any, results: Any) -> None:
    torch.set_num_threads(1)  # as the language service's API process does
    barrier.wait()
    results.put(asyncio.run(_client(*args)))


def _next_outcome(queue: Any, processes: list[Any], limit_s: float = 600) -> dict[str, Any]:
    """The next client's result; fails at once if a client process died without one."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1)
        except Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed:
                for process in processes:
                    process.kill()
                raise RuntimeError(f"a client process failed (exit codes {failed})") from None
    raise TimeoutError(f"no client result within {limit_s:.0f} s")


def memcpy_rate(size_bytes: int, repeat: int = 20) -> float:
    source = torch.empty(size_bytes, dtype=torch.uint8)
    target = torch.empty_like(source)
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        target.copy_(source)
        rates.append(size_bytes / (time.perf_counter() - started))
    return statistics.median(rates)


def measure(
    ports: list[int],
    size_bytes: int,
    *,
    transport: str,
    streams: int,
    clients: int,
    channels: int,
    calls: int,
    reserve_bytes: int,
) -> dict[str, Any]:
    """One configuration: ``clients`` processes x ``streams`` concurrent calls each."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients)
    queue = context.Queue()
    processes = [
        context.Process(
            target=_client_process,
            args=(
                (
                    f"127.0.0.1:{ports[i % len(ports)]}",
                    size_bytes,
                    streams,
                    calls,
                    channels,
                    transport,
                    reserve_bytes,
                ),
                barrier,
                queue,
            ),
        )
        for i in range(clients)
    ]
    for process in processes:
        process.start()
    outcomes = [_next_outcome(queue, processes) for _ in processes]
    for process in processes:
        process.join(30)
    latencies = sorted(x for outcome in outcomes for x in outcome["latencies"])
    payload = rows_for(size_bytes) * ROW_BYTES
    wall = max(o["started"] + o["wall"] for o in outcomes) - min(o["started"] for o in outcomes)
    return {
        "transport": transport,
        "size_mb": size_bytes / 2**20,
        "streams": streams,
        "clients": clients,
        "servers": len(ports),
        "channels": channels,
        "calls": len(latencies),
        "aggregate_gb_per_s": payload * len(latencies) / wall / 1e9,
        "call_gb_per_s_p50": payload / statistics.median(latencies) / 1e9,
        "call_ms_p50": statistics.median(latencies) * 1000,
        "call_ms_p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "memcpy_gb_per_s": memcpy_rate(payload) / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.5, 1.7, 6.8, 27.3])
    parser.add_argument("--transports", nargs="+", default=["grpc", "shared-memory"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--clients", type=int, default=1, help="client processes")
    parser.add_argument("--servers", type=int, default=1, help="stand-in server processes")
    parser.add_argument("--channels", type=int, default=1, help="gRPC channels per client")
    parser.add_argument("--calls", type=int, default=20, help="calls per stream")
    parser.add_argument("--chunk-mb", type=float, default=2.0)
    parser.add_argument(
        "--port", type=int, default=0, help="first stand-in server port (0: free ones)"
    )
    parser.add_argument(
        "--server-torch-threads",
        type=int,
        default=0,
        help="torch threads of each stand-in server, as the vision service's --torch-threads",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)

    if "shared-memory" in args.transports and not shm.available():
        parser.error("shared memory (/dev/shm) is not available on this host")
    max_rows = max(rows_for(int(mb * 2**20)) for mb in args.sizes_mb)
    context = multiprocessing.get_context("spawn")
    ports = []
    servers = []
    for i in range(args.servers):
        bound = context.Queue()
        port = args.port + i if args.port else 0
        server = context.Process(
            target=_serve,
            args=(port, int(args.chunk_mb * 2**20), max_rows, bound, args.server_torch_threads),
            daemon=True,
        )
        server.start()
        servers.append(server)
        try:
            ports.append(int(bound.get(timeout=60)))
        except Empty:
            raise RuntimeError("transport benchmark server did not start") from None
    results = []
    try:
        for transport in args.transports:
            for size_mb in args.sizes_mb:
                for streams in args.streams:
                    results.append(
                        measure(
                            ports,
                            int(size_mb * 2**20),
                            transport=transport,
                            streams=streams,
                            clients=args.clients,
                            channels=args.channels,
                            calls=args.calls,
                            reserve_bytes=max_rows * ROW_BYTES,
                        )
                    )
    finally:
        for server in servers:
            server.terminate()
            server.join(5)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"clients: {args.clients} process(es), servers: {args.servers}, "
        f"channels per client: {args.channels}\n"
    )
    print(
        "| transport | embeddings | concurrent calls | aggregate GB/s | one call GB/s (p50) "
        "| call ms p50 | call ms p99 | memory copy GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['transport']} | {r['size_mb']:.1f} MB | {r['streams'] * r['clients']} | "
            f"{r['aggregate_gb_per_s']:.2f} | {r['call_gb_per_s_p50']:.2f} | "
            f"{r['call_ms_p50']:.2f} | {r['call_ms_p99']:.2f} | {r['memcpy_gb_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()

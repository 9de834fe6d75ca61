"""Embedding transport benchmark: the Encode stream's bytes/s on loopback vs a memory copy.

    python -m benchmarks.transport [--sizes-mb 1.7 6.8 27] [--chunk-mb 2] [--repeat 20]

A stand-in vision server (its own process) streams a pre-computed embedding tensor with the
vision service's registration and chunk encoding; the language service's ``GrpcImageEncoder``
receives and reassembles it. No model runs, so the numbers are the transport's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch

from llm_server.vision.base import EncodeOptions, ImageInput
from llm_server.vision.grpc_client import GrpcImageEncoder
from protos import codec
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc
from vision_server.service import add_vision_service

HIDDEN = 1024  # InternVL3.5-1B's LLM width; sizes are set in MB, the row count follows


class _StreamingServicer(vision_pb2_grpc.VisionServiceServicer):
    """Answers every Encode call with one image of the size asked for (in KiB, via max_tiles)."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.tensors: dict[int, torch.Tensor] = {}

    def tensor(self, num_bytes: int) -> torch.Tensor:
        if num_bytes not in self.tensors:
            rows = max(1, num_bytes // (HIDDEN * 2))
            self.tensors[num_bytes] = torch.randn(rows, HIDDEN).to(torch.bfloat16)
        return self.tensors[num_bytes]

    async def Encode(  # noqa: N802
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse | bytes]:
        tensor = self.tensor(request.options.max_tiles * 1024)
        rows = int(tensor.shape[0])
        yield vision_pb2.EncodeResponse(
            header=vision_pb2.ImageHeader(
                image_index=0,
                num_tiles=1,
                tokens_per_tile=[rows],
                num_visual_tokens=rows,
                hidden_size=HIDDEN,
                dtype=codec.wire_dtype(tensor.dtype),
                num_bytes=tensor.numel() * 2,
                full_tokens_per_tile=rows,
            )
        )
        for message in codec.encode_chunk_messages(tensor, 0, self.chunk_bytes):
            yield message

    async def GetModelInfo(  # noqa: N802
        self, request: vision_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.ModelInfo:
        return vision_pb2.ModelInfo(
            model_id="transport-stand-in", hidden_size=HIDDEN, dtype=vision_pb2.DTYPE_BFLOAT16
        )


def _serve(port: int, chunk_bytes: int, ready: Any) -> None:
    async def run() -> None:
        server = grpc.aio.server()
        add_vision_service(_StreamingServicer(chunk_bytes), server)  # type: ignore[arg-type]
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(run())


async def _measure(port: int, size_bytes: int, repeat: int) -> list[float]:
    encoder = GrpcImageEncoder(f"127.0.0.1:{port}", timeout_s=60, expected_hidden_size=HIDDEN)
    options = EncodeOptions(max_tiles=size_bytes // 1024)
    rates = []
    try:
        for attempt in range(repeat + 2):
            started = time.perf_counter()
            (image,) = await encoder.encode([ImageInput(b"")], options, "transport-bench")
            elapsed = time.perf_counter() - started
            if attempt >= 2:  # the first calls set up the connection and the tensor
                rates.append(image.embeddings.numel() * 2 / elapsed)
    finally:
        await encoder.close()
    return rates


def memcpy_rate(size_bytes: int, repeat: int) -> float:
    source = torch.empty(size_bytes, dtype=torch.uint8)
    target = torch.empty_like(source)
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        target.copy_(source)
        rates.append(size_bytes / (time.perf_counter() - started))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.5, 1.7, 6.8, 27.3])
    parser.add_argument("--chunk-mb", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--port", type=int, default=50199)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)

    chunk_bytes = int(args.chunk_mb * 1024 * 1024)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    server = context.Process(target=_serve, args=(args.port, chunk_bytes, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("transport benchmark server did not start")
        results = []
        for size_mb in args.sizes_mb:
            size = int(size_mb * 1024 * 1024)
            rates = asyncio.run(_measure(args.port, size, args.repeat))
            results.append(
                {
                    "size_mb": size_mb,
                    "chunk_mb": args.chunk_mb,
                    "grpc_gb_per_s": statistics.median(rates) / 1e9,
                    "grpc_gb_per_s_p10": sorted(rates)[len(rates) // 10] / 1e9,
                    "memcpy_gb_per_s": memcpy_rate(size, args.repeat) / 1e9,
                }
            )
    finally:
        server.terminate()
        server.join(5)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| embeddings | chunk | gRPC stream GB/s (median) | p10 | memory copy GB/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['size_mb']:.1f} MB | {r['chunk_mb']:g} MiB | {r['grpc_gb_per_s']:.2f} | "
            f"{r['grpc_gb_per_s_p10']:.2f} | {r['memcpy_gb_per_s']:.1f} | "
            f"{r['grpc_gb_per_s'] / r['memcpy_gb_per_s']:.3f} |"
        )


if __name__ == "__main__":
    main()

"""The coupled baseline: the same vision pipeline, inside the language service's process.

No gRPC hop and no separate device: images are encoded in this process before prefill, with
the exact code the vision service runs. It is what DvD is measured against, and the simplest
single-process deployment.

This is the only module of the language service that uses the vision service's code, and it
imports it when the encoder starts, so the gRPC deployment never loads the ViT code.

On a GPU that vLLM also uses, the ViT is loaded first and run once at its largest batch, and
vLLM gets what is left of ``--gpu-memory-utilization`` (see ``GpuShare``): otherwise vLLM
would size its KV cache over the whole share and the first large image batch would run out
of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from checkpoints.weights import safetensors_files
from llm_server import metrics, tracing
from llm_server.errors import VisionBadResponse
from llm_server.vision.errors import api_error
from protos.messages import ContractError, EncodeCall, EncodeResult, VisualEmbedding, result_of

if TYPE_CHECKING:
    from vision_server.pipeline import VisionPipeline

logger = logging.getLogger(__name__)

_GIB = 1024**3


class InsufficientGpuMemory(RuntimeError):
    """The in-process ViT and vLLM do not both fit in the GPU share they were given."""


@dataclass(frozen=True)
class GpuShare:
    """How one card is split in coupled mode between the in-process ViT and vLLM.

    ``--gpu-memory-utilization`` is the whole service's share of the card; the ViT takes its
    weights plus the activations of its largest batch, and vLLM the rest, which must at
    least hold the language model's weights (vLLM needs its KV cache on top)."""

    total_bytes: int  # the card
    utilization: float  # --gpu-memory-utilization
    vision_bytes: int  # the ViT: weights + peak activations at max_batch_tiles
    llm_weight_bytes: int  # the language model's weights
    max_batch_tiles: int
    device: str

    @property
    def llm_bytes(self) -> int:
        return int(self.total_bytes * self.utilization) - self.vision_bytes

    def llm_utilization(self) -> float:
        """vLLM's ``gpu_memory_utilization``; raises ``InsufficientGpuMemory`` when the
        language model cannot fit beside the ViT."""
        if self.llm_bytes <= self.llm_weight_bytes:
            raise InsufficientGpuMemory(
                f"--vision inprocess on {self.device}: the vision encoder takes "
                f"{self.vision_bytes / _GIB:.2f} GiB (weights and a {self.max_batch_tiles}-tile "
                f"batch), which leaves {max(self.llm_bytes, 0) / _GIB:.2f} GiB of "
                f"--gpu-memory-utilization={self.utilization} x {self.total_bytes / _GIB:.2f} GiB "
                f"for vLLM, not enough for the language model's "
                f"{self.llm_weight_bytes / _GIB:.2f} GiB of weights and its KV cache. Raise "
                "--gpu-memory-utilization, lower --vision-max-batch-tiles, or run the vision "
                "service on its own GPU (--vision grpc)."
            )
        return self.llm_bytes / self.total_bytes


def shares_llm_gpu(device: str, llm_gpus: int) -> bool:
    """Whether the in-process encoder on ``device`` sits on one of the ``llm_gpus`` GPUs
    vLLM uses (the first tensor x pipeline parallel ones)."""
    import torch

    if device == "auto":
        return torch.cuda.is_available()
    resolved = torch.device(device)
    return resolved.type == "cuda" and (resolved.index or 0) < llm_gpus


def llm_weight_bytes(checkpoint: Path) -> int:
    """Bytes of the language model's tensors, from the safetensors headers (nothing loaded)."""
    total = 0
    for path in safetensors_files(checkpoint):
        with path.open("rb") as file:
            (header_bytes,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_bytes))
        for name, entry in header.items():
            if name.startswith("language_model."):
                start, end = entry["data_offsets"]
                total += end - start
    return total


def _hold_peak_memory(pipeline: VisionPipeline, max_batch_tiles: int) -> int:
    """Run one full batch on the GPU; returns the bytes this process then holds on it. The
    caching allocator keeps the peak reserved, so vLLM will find that memory taken."""
    import torch

    device = pipeline.engine.device
    size = pipeline.spec.vision.image_size
    with torch.inference_mode():
        tiles = torch.zeros(max_batch_tiles, 3, size, size, device=device)
        pipeline.engine.encoder(tiles.to(pipeline.engine.dtype))
    del tiles
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_reserved(device))


class InProcessVisualEncoder:
    """``VisualEncoder`` that runs the vision pipeline in this process."""

    def __init__(self, pipeline: VisionPipeline, gpu_bytes: int | None = None) -> None:
        self.pipeline = pipeline
        self.gpu_bytes = gpu_bytes  # held on its CUDA device (None on CPU)

    @classmethod
    async def start(
        cls, checkpoint: Path, cache_dir: Path, device: str, max_batch_tiles: int
    ) -> InProcessVisualEncoder:
        """Load the checkpoint's vision half on ``device`` and start its tile batcher. On
        CUDA, one batch of ``max_batch_tiles`` runs first, to hold and measure its memory."""
        from vision_server import tracing as vision_tracing
        from vision_server.server import build_pipeline
        from vision_server.settings import VisionSettings

        if tracing.enabled():
            # The pipeline's spans (preprocess, queue, passes, route) nest under "vision".
            vision_tracing.use_process_tracing()

        settings = VisionSettings(  # type: ignore[call-arg]
            model=str(checkpoint),
            cache_dir=str(cache_dir),
            device=device,
            max_batch_tiles=max_batch_tiles,
            # Next to vLLM on the same GPU, memory is measured and split once at start-up
            # (gpu_share); graphs' pools would change that measure: passes stay eager.
            cuda_graphs=False,
        )
        pipeline, _ = await asyncio.to_thread(build_pipeline, settings)
        gpu_bytes = None
        if pipeline.engine.device.type == "cuda":
            gpu_bytes = await asyncio.to_thread(_hold_peak_memory, pipeline, max_batch_tiles)
        pipeline.engine.start()
        return cls(pipeline, gpu_bytes)

    @property
    def max_tiles_limit(self) -> int:
        """The largest per-image max_tiles this encoder accepts (its settings')."""
        return int(self.pipeline.settings.max_tiles_limit)

    def gpu_share(self, checkpoint: Path, utilization: float) -> GpuShare:
        """The split of this encoder's CUDA device with a vLLM given ``utilization``."""
        import torch

        if self.gpu_bytes is None:
            raise ValueError("the in-process encoder is not on a CUDA device")
        device = self.pipeline.engine.device
        _, total = torch.cuda.mem_get_info(device)
        share = GpuShare(
            total_bytes=int(total),
            utilization=utilization,
            vision_bytes=self.gpu_bytes,
            llm_weight_bytes=llm_weight_bytes(checkpoint),
            max_batch_tiles=self.pipeline.settings.max_batch_tiles,
            device=str(device),
        )
        logger.info(
            "%s shared: vision encoder %.2f GiB, vLLM %.2f GiB of %.2f GiB (utilization %.3f)",
            device,
            share.vision_bytes / _GIB,
            max(share.llm_bytes, 0) / _GIB,
            share.total_bytes / _GIB,
            utilization,
        )
        return share

    async def encode(self, call: EncodeCall) -> EncodeResult:
        from vision_server.errors import VisionError

        items: list[VisualEmbedding] = []
        try:
            # aclosing: a cancelled request lets go of its embedding-cache claims at once.
            async with contextlib.aclosing(self.pipeline.encode(call)) as encoded_items:
                async for item in encoded_items:
                    metrics.vision_queue_wait.observe(item.queue_ms / 1000)
                    metrics.vision_encode.observe(item.encode_ms / 1000)
                    items.append(item)
        except VisionError as exc:  # typed all the way: its code and field, no message read
            raise api_error(exc.detail, str(exc)) from exc
        try:
            return result_of(call, items)
        except ContractError as exc:
            raise VisionBadResponse(str(exc)) from exc

    async def ready(self) -> bool:
        return self.pipeline.engine.failure is None

    async def close(self) -> None:
        await self.pipeline.engine.stop()
        self.pipeline.close()

"""The vision engine: one encoder model, fed by the tile batcher.

The gRPC layer hands it prepared images and gets embeddings back; it knows nothing of gRPC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vision_server.batching import BatchStats, TileBatcher
from vision_server.model.encoder import VisionEncoder
from vision_server.preprocess import PreparedImage
from vision_server.tiling import TileGrid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedImage:
    embeddings: torch.Tensor  # [num_visual_tokens, llm_hidden], on CPU, engine dtype
    tokens_per_tile: list[int]
    grid: TileGrid
    stats: BatchStats

    @property
    def num_visual_tokens(self) -> int:
        return int(self.embeddings.shape[0])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _split_rows(outputs: torch.Tensor, sizes: list[int]) -> list[object]:
    return list(outputs.split(sizes))


class EncoderEngine:
    """Runs the vision encoder over batched tiles and assembles per-image embeddings."""

    def __init__(
        self,
        encoder: VisionEncoder,
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_batch_tiles: int,
        max_wait_ms: float,
        max_queued_tiles: int,
    ) -> None:
        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.hidden_size = encoder.spec.llm_hidden_size
        self.batcher: TileBatcher[torch.Tensor] = TileBatcher(
            self._run_pass,
            _split_rows,
            max_batch_tiles=max_batch_tiles,
            max_wait_ms=max_wait_ms,
            max_queued_tiles=max_queued_tiles,
        )

    def _run_pass(self, tiles: torch.Tensor) -> torch.Tensor:
        # Runs on the batcher's thread: [n, 3, 448, 448] -> [n, 256, hidden] on CPU.
        with torch.inference_mode():
            out = self.encoder(tiles.to(self.device, self.dtype, non_blocking=True))
            return out.to("cpu")

    def warmup(self) -> None:
        """One forward pass so the first request does not pay for lazy initialisation."""
        size = self.encoder.spec.vision.image_size
        self._run_pass(torch.zeros(1, 3, size, size))

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def encode(self, image: PreparedImage, request_id: str = "") -> EncodedImage:
        """Embeddings of one prepared image: ``[tiles * tokens_per_tile, hidden]``."""
        pieces, stats = await self.batcher.submit(image.tiles, request_id)
        per_tile = torch.cat([p for p in pieces if isinstance(p, torch.Tensor)])
        tokens = [int(per_tile.shape[1])] * int(per_tile.shape[0])
        return EncodedImage(
            embeddings=per_tile.reshape(-1, self.hidden_size),
            tokens_per_tile=tokens,
            grid=image.grid,
            stats=stats,
        )

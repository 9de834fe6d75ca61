"""The vision engine: one encoder model, fed by the tile batcher, plus per-image routing.

The gRPC layer hands it prepared images and gets embeddings back; it knows nothing of gRPC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from protos.options import VirMode
from vision_server import metrics
from vision_server.batching import BatchStats, TileBatcher
from vision_server.model.encoder import TileEmbeddings, VisionEncoder
from vision_server.preprocess import PreparedImage
from vision_server.routing import route_tiles
from vision_server.tiling import TileGrid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedImage:
    embeddings: torch.Tensor  # [num_visual_tokens, llm_hidden], on CPU, engine dtype
    tokens_per_tile: list[int]
    grid: TileGrid
    stats: BatchStats
    vir_mode: VirMode | None  # None: the checkpoint has no router

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


def compute_dtype_for_device(name: str, device: torch.device) -> torch.dtype:
    """The ViT's compute dtype: ``auto`` is bfloat16 on CUDA and float32 elsewhere, whatever
    the checkpoint was saved in (the language service follows the checkpoint instead)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _split(outputs: TileEmbeddings, sizes: list[int]) -> list[object]:
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
        self.spec = encoder.spec
        self.device = device
        self.dtype = dtype
        self.hidden_size = encoder.spec.llm_hidden_size
        self.batcher: TileBatcher[TileEmbeddings] = TileBatcher(
            self._run_pass,
            _split,
            max_batch_tiles=max_batch_tiles,
            max_wait_ms=max_wait_ms,
            max_queued_tiles=max_queued_tiles,
            on_pass=metrics.observe_pass,
        )
        # Read at scrape time, so the gauge is exact without bookkeeping on the hot path.
        metrics.queued_tiles.set_function(lambda: self.batcher.queued_tiles)

    @property
    def has_router(self) -> bool:
        return self.encoder.has_router

    def _run_pass(self, tiles: torch.Tensor) -> TileEmbeddings:
        # Runs on the batcher's thread: [n, 3, 448, 448] -> per-tile embeddings on the CPU
        # (the router's ViT features stay on the device until their image is complete).
        with torch.inference_mode():
            out = self.encoder(tiles.to(self.device, self.dtype, non_blocking=True))
            return TileEmbeddings(
                out.full.to("cpu"),
                out.compressed.to("cpu") if out.compressed is not None else None,
                out.features,
            )

    def _finalize(
        self, pieces: list[TileEmbeddings], vir_mode: VirMode, absolute_threshold: float | None
    ) -> tuple[torch.Tensor, list[bool], VirMode | None]:
        """On the batcher's thread: route the image's tiles and assemble its rows."""
        tiles = TileEmbeddings.concat(pieces)
        flash = self.spec.flash
        if flash is None or tiles.compressed is None or tiles.features is None:
            return tiles.full.reshape(-1, self.hidden_size), [False] * len(tiles.full), None
        if vir_mode is VirMode.AUTO:
            with torch.inference_mode():
                p0 = self.encoder.compress_prob(tiles.features).float().to("cpu")
        else:
            p0 = torch.zeros(len(tiles.full))  # not needed: every tile goes the same way
        threshold = flash.absolute_threshold if absolute_threshold is None else absolute_threshold
        compress = route_tiles(p0, vir_mode, flash.relative_threshold, threshold)
        rows = [
            tiles.compressed[i] if squeeze else tiles.full[i] for i, squeeze in enumerate(compress)
        ]
        return torch.cat(rows), compress, vir_mode

    def warmup(self) -> None:
        """One forward pass so the first request does not pay for lazy initialisation."""
        size = self.encoder.spec.vision.image_size
        self._run_pass(torch.zeros(1, 3, size, size))

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def encode(
        self,
        image: PreparedImage,
        request_id: str = "",
        vir_mode: VirMode = VirMode.AUTO,
        absolute_threshold: float | None = None,
    ) -> EncodedImage:
        """Embeddings of one prepared image: each tile's 256 rows, or 64 where routed."""
        pieces, stats = await self.batcher.submit(image.tiles, request_id)
        parts = [p for p in pieces if isinstance(p, TileEmbeddings)]
        embeddings, compress, applied = await self.batcher.run_on_worker(
            self._finalize, parts, vir_mode, absolute_threshold
        )
        tokens = [
            self.spec.compressed_tokens_per_tile if squeeze else self.spec.tokens_per_tile
            for squeeze in compress
        ]
        metrics.observe_routing(
            kept=compress.count(False),
            compressed=compress.count(True),
            full_tokens=self.spec.tokens_per_tile,
            compressed_tokens=self.spec.compressed_tokens_per_tile,
        )
        return EncodedImage(embeddings, tokens, image.grid, stats, applied)

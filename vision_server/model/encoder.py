"""The vision half of InternVL: InternViT, pixel shuffle and the MLP connector."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from checkpoints.spec import CheckpointError, CheckpointSpec
from checkpoints.weights import load_vision_weights
from vision_server.model.intern_vit import InternViT
from vision_server.model.projector import CompressedProjector, MLPProjector, pixel_shuffle
from vision_server.model.router import CrossAttentionPooling, Gating

logger = logging.getLogger(__name__)


@dataclass
class TileEmbeddings:
    """Per-tile outputs of one forward pass (all tensors have the tiles as first axis)."""

    full: torch.Tensor  # [tiles, 256, llm_hidden]
    compressed: torch.Tensor | None = None  # [tiles, 64, llm_hidden] (Flash only)
    # The router's p0 per tile, in the compute dtype (Flash only); the decision itself needs
    # every tile of the request and is taken later (vision_server.routing).
    compress_prob: torch.Tensor | None = None  # [tiles]


class TileNormaliser:
    """uint8 pixels -> normalised tiles: ``[n, 3, H, W]`` uint8 -> ``[n, 3, H, W]`` ``dtype``.

    In float32, in the order transformers' image processor uses (``/ 255``, ``- mean``,
    ``/ std``: each op correctly rounded, no reciprocal multiplications), so the result is
    bit-identical to it; then rounded once to the compute dtype. It runs on the encoder's
    device, which is why tiles travel as uint8 (4x fewer bytes to copy in). The constants are
    put on the device once: making them per pass would be a synchronous host-to-device copy.
    """

    def __init__(
        self,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device: torch.device | str,
    ) -> None:
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
        # A tensor, not a Python number: CUDA turns division by a host scalar into a
        # multiplication by its reciprocal, which is not bit-identical.
        self.full_scale = torch.tensor(255.0, dtype=torch.float32, device=device)

    def __call__(self, tiles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scaled = tiles.to(torch.float32) / self.full_scale
        return ((scaled - self.mean) / self.std).to(dtype)


class VisionEncoder(nn.Module):
    """Normalised tiles in, LLM-width visual embeddings out.

    ``forward``: ``[tiles, 3, 448, 448]`` -> ``TileEmbeddings``: 256 tokens per tile through
    ``mlp1`` and, on Flash checkpoints, 64 tokens per tile through ``mlp2`` plus the router's
    p0 per tile (both paths are cheap next to the ViT, about 1% of its FLOPs). Parameter
    names follow OpenGVLab's checkpoints (``vision_model.*``, ``mlp1.*``, ``mlp2.*``,
    ``pooling_before_gating.*``, ``gating.*``).
    """

    def __init__(self, spec: CheckpointSpec) -> None:
        super().__init__()
        self.spec = spec
        self.vision_model = InternViT(spec.vision)
        width = spec.vision.hidden_size
        fold = int(round(1 / spec.downsample_ratio)) ** 2
        self.mlp1 = MLPProjector(width * fold, spec.llm_hidden_size)
        self.has_router = spec.flash is not None
        if spec.flash is not None:
            self.mlp2 = CompressedProjector(width * fold * fold, spec.llm_hidden_size)
            self.pooling_before_gating = CrossAttentionPooling(width, spec.flash.pooling_heads)
            self.gating = Gating(width, spec.flash.gating_expansion)

    @property
    def tokens_per_tile(self) -> int:
        return self.spec.tokens_per_tile

    def _project(self, grid: torch.Tensor, scale: float, projector: nn.Module) -> torch.Tensor:
        shuffled = pixel_shuffle(grid, scale)  # [n, side*scale, side*scale, width/scale^2]
        return projector(shuffled.reshape(grid.shape[0], -1, shuffled.shape[-1]))

    def forward(self, tiles: torch.Tensor) -> TileEmbeddings:
        features = self.vision_model(tiles)  # [n, 1024, vit_width]
        n, patches, width = features.shape
        side = int(patches**0.5)
        grid = features.reshape(n, side, side, width)
        ratio = self.spec.downsample_ratio
        full = self._project(grid, ratio, self.mlp1)  # [n, 256, llm_hidden]
        if not self.has_router:
            return TileEmbeddings(full)
        compressed = self._project(grid, ratio * ratio, self.mlp2)  # [n, 64, llm_hidden]
        return TileEmbeddings(full, compressed, self.compress_prob(features))

    def compress_prob(self, features: torch.Tensor) -> torch.Tensor:
        """Router p0 per tile: ``[tiles, 1024, vit_width] -> [tiles]``. Each tile's p0 reads
        only that tile's features, so it does not depend on what else shares the pass."""
        return self.gating(self.pooling_before_gating(features))[:, 0]

    @classmethod
    def from_checkpoint(
        cls, spec: CheckpointSpec, device: torch.device | str, dtype: torch.dtype
    ) -> VisionEncoder:
        """Build the encoder and load its weights from ``spec.path`` (safetensors only)."""
        with torch.device("meta"):
            model = cls(spec)
        weights = load_vision_weights(spec.path, spec.layout)
        expected = set(model.state_dict())
        # Encoder layers past select_layer are not built; their weights are not needed.
        unused = {k for k in weights if k not in expected}
        missing = sorted(expected - set(weights))
        if missing:
            raise CheckpointError(f"checkpoint lacks vision weights: {missing[:5]}…")
        if unused:
            logger.info("ignoring %d checkpoint tensors the encoder does not use", len(unused))
        state = {k: v.to(dtype=dtype) for k, v in weights.items() if k in expected}
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device=device).eval()

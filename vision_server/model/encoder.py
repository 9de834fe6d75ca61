"""The vision half of InternVL: InternViT, pixel shuffle and the MLP connector."""

from __future__ import annotations

import logging

import torch
from torch import nn

from vision_server.checkpoints.spec import CheckpointError, CheckpointSpec
from vision_server.checkpoints.weights import load_vision_weights
from vision_server.model.intern_vit import InternViT
from vision_server.model.projector import MLPProjector, pixel_shuffle

logger = logging.getLogger(__name__)


class VisionEncoder(nn.Module):
    """Normalised tiles in, LLM-width visual embeddings out.

    ``forward``: ``[tiles, 3, 448, 448] -> [tiles, tokens_per_tile, llm_hidden]``.
    Parameter names follow OpenGVLab's checkpoints (``vision_model.*``, ``mlp1.*``).
    """

    def __init__(self, spec: CheckpointSpec) -> None:
        super().__init__()
        self.spec = spec
        self.vision_model = InternViT(spec.vision)
        fold = int(round(1 / spec.downsample_ratio)) ** 2
        self.mlp1 = MLPProjector(spec.vision.hidden_size * fold, spec.llm_hidden_size)

    @property
    def tokens_per_tile(self) -> int:
        return self.spec.tokens_per_tile

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        features = self.vision_model(tiles)  # [n, 1024, vit_width]
        n, patches, width = features.shape
        side = int(patches**0.5)
        grid = features.reshape(n, side, side, width)
        shuffled = pixel_shuffle(grid, self.spec.downsample_ratio)  # [n, 16, 16, 4 * vit_width]
        return self.mlp1(shuffled.reshape(n, -1, shuffled.shape[-1]))  # [n, 256, llm_hidden]

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

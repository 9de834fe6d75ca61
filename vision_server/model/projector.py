"""Pixel shuffle and the MLP connector that maps ViT features to the LLM's width."""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Fold neighbouring patches into channels (InternVL's ``ps_version='v2'``).

    ``[n, side, side, c] -> [n, side*scale, side*scale, c/scale^2]``; scale 0.5 turns the
    32x32 patch grid of a 448 tile into 16x16 = 256 tokens, scale 0.25 into 8x8 = 64.
    """
    n, width, height, channels = features.shape
    new_height, new_width = int(height * scale), int(width * scale)
    if new_height / scale != height or new_width / scale != width:
        raise ValueError(f"a {width}x{height} grid cannot be shuffled by {scale}")
    # Fold along the second axis, swap, fold along the other, swap back.
    x = features.reshape(n, width, new_height, int(channels / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, new_height, new_width, int(channels / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class MLPProjector(nn.Sequential):
    """InternVL's ``mlp1``: LayerNorm, Linear, GELU, Linear (indices 0, 1, 2, 3)."""

    def __init__(self, in_width: int, llm_width: int) -> None:
        super().__init__(
            nn.LayerNorm(in_width),
            nn.Linear(in_width, llm_width),
            nn.GELU(),
            nn.Linear(llm_width, llm_width),
        )


class CompressedProjector(nn.Sequential):
    """InternVL3.5-Flash's ``mlp2`` for 64-token tiles (pixel shuffle 0.25, 16x ViT width):
    LayerNorm, Linear to 2x LLM width, GELU, Linear, GELU, Linear to the LLM width.
    Indices 0, 1, 4, 7 hold weights, as in the checkpoints (dropouts in between)."""

    def __init__(self, in_width: int, llm_width: int) -> None:
        super().__init__(
            nn.LayerNorm(in_width),
            nn.Linear(in_width, 2 * llm_width),
            nn.GELU(),
            nn.Identity(),
            nn.Linear(2 * llm_width, 2 * llm_width),
            nn.GELU(),
            nn.Identity(),
            nn.Linear(2 * llm_width, llm_width),
        )

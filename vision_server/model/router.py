"""InternVL3.5-Flash's Visual Resolution Router (ViR), with the published parameter names.

Per tile: a learnable query attends over the tile's 1024 ViT tokens (``pooling_before_gating``)
and a residual MLP classifier (``gating``) turns the pooled vector into two probabilities; p0
is the probability that the tile can be compressed from 256 to 64 tokens. The decision rule
itself lives in ``vision_server.routing``.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossAttentionPooling(nn.Module):
    """``[tiles, tokens, width] -> [tiles, width]`` by attention from one learned query.

    The published checkpoints carry four attention + LayerNorm stages (``attn1..4``,
    ``norm1..4``) but their reference forward pass applies ``attn1/norm1`` once and then
    ``attn2/norm2`` three times; ``attn3/4`` and ``norm3/4`` are loaded and unused. We compute
    exactly what the trained router computed.
    """

    def __init__(self, width: int, num_heads: int = 16) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, width))

        def attention() -> nn.MultiheadAttention:
            return nn.MultiheadAttention(width, num_heads, batch_first=True)

        self.attn1, self.norm1 = attention(), nn.LayerNorm(width)
        self.attn2, self.norm2 = attention(), nn.LayerNorm(width)
        self.attn3, self.norm3 = attention(), nn.LayerNorm(width)
        self.attn4, self.norm4 = attention(), nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.query_token.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [n, 1, width]
        stages = [(self.attn1, self.norm1)] + [(self.attn2, self.norm2)] * 3
        for attention, norm in stages:
            query, _ = attention(query, tokens, tokens, need_weights=False)
            query = norm(query)
        return query.squeeze(1)


def _gating_block(width: int, hidden: int) -> nn.Sequential:
    # Indices match the checkpoints: 0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout, 5 LayerNorm.
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.GELU(),
        nn.Identity(),
        nn.Linear(hidden, width),
        nn.Identity(),
        nn.LayerNorm(width),
    )


class Gating(nn.Module):
    """Four residual MLP blocks, then LayerNorm + Linear to 2 logits; returns softmax probs."""

    def __init__(self, width: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = width * expansion
        self.block1 = _gating_block(width, hidden)
        self.block2 = _gating_block(width, hidden)
        self.block3 = _gating_block(width, hidden)
        self.block4 = _gating_block(width, hidden)
        self.gate = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled
        for block in (self.block1, self.block2, self.block3, self.block4):
            x = x + block(x)
        return torch.softmax(self.gate(x), dim=-1)  # [tiles, 2]

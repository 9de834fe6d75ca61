"""An independent Visual Resolution Router: each tile's p0 as the published InternVL3.5-Flash
model computes it, without DvD's model code.

ViT features come from transformers' InternVL (the ``oracle`` fixture, on the same seed's
weights); the router's query-token attention pooling and gating MLP run as plain torch
functional ops on the Flash checkpoint's own tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file


def router_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The router's tensors of an original-layout Flash checkpoint."""
    weights = load_file(str(checkpoint / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.startswith(("pooling_before_gating.", "gating."))}


def router_thresholds(checkpoint: Path) -> tuple[float, float]:
    """The checkpoint's (relative, absolute) router thresholds."""
    config = json.loads((checkpoint / "config.json").read_text())
    return config["flash_relative_threshold"], config["flash_absolute_threshold"]


def vit_features(oracle: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' ViT output without its class token: ``[tiles, 1024, D]``."""
    model, _ = oracle
    with torch.no_grad():
        return model.model.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]


def image_tiles(oracle: Any, image: Image.Image) -> torch.Tensor:
    """An image's tiles (grid, then thumbnail) as transformers' processor cuts them."""
    _, processor = oracle
    return processor(image, crop_to_patches=True, return_tensors="pt")["pixel_values"]


def frame_tiles(oracle: Any, frames: list[Image.Image]) -> torch.Tensor:
    """Video frames, one tile each."""
    _, processor = oracle
    return processor(frames, crop_to_patches=False, return_tensors="pt")["pixel_values"]


def compress_prob(weights: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """p0 per tile, ``[tiles]``: query-token attention pooling (attn1, then attn2 three
    times), then the residual gating MLP and its softmax's first column."""
    n, _, width = features.shape
    keys = features.transpose(0, 1)  # [1024, n, D]: functional MHA is sequence-first
    query = weights["pooling_before_gating.query_token"].unsqueeze(1).expand(1, n, width)
    with torch.no_grad():
        for stage in (1, 2, 2, 2):
            prefix = f"pooling_before_gating.attn{stage}"
            query, _ = F.multi_head_attention_forward(
                query, keys, keys, width, 16,
                weights[f"{prefix}.in_proj_weight"], weights[f"{prefix}.in_proj_bias"],
                None, None, False, 0.0,
                weights[f"{prefix}.out_proj.weight"], weights[f"{prefix}.out_proj.bias"],
                training=False, need_weights=False,
            )  # fmt: skip
            norm = f"pooling_before_gating.norm{stage}"
            query = F.layer_norm(
                query, (width,), weights[f"{norm}.weight"], weights[f"{norm}.bias"]
            )
        x = query.squeeze(0)  # [n, D]
        for block in range(1, 5):
            p = f"gating.block{block}"
            h = F.gelu(F.linear(x, weights[f"{p}.0.weight"], weights[f"{p}.0.bias"]))
            h = F.linear(h, weights[f"{p}.3.weight"], weights[f"{p}.3.bias"])
            x = x + F.layer_norm(h, (width,), weights[f"{p}.5.weight"], weights[f"{p}.5.bias"])
        x = F.layer_norm(
            x, (width,), weights["gating.gate.0.weight"], weights["gating.gate.0.bias"]
        )
        logits = F.linear(x, weights["gating.gate.1.weight"], weights["gating.gate.1.bias"])
    return logits.softmax(-1)[:, 0]

"""The Visual Resolution Router's decision rule, per image (pure arithmetic).

A tile is compressed (256 -> 64 tokens) when its compress probability p0 is above the
``relative_threshold`` quantile of p0 over the tiles of the same image **and** at least the
``absolute_threshold``. Taking the quantile over one image makes the decision independent of
whatever else shares the server's forward pass. (OpenGVLab's reference code takes it over all
tiles of one chat sample; for single-image requests the two agree.)
"""

from __future__ import annotations

import torch

from protos.options import VirMode


def route_tiles(
    compress_prob: torch.Tensor,
    mode: VirMode,
    relative_threshold: float,
    absolute_threshold: float,
) -> list[bool]:
    """Which tiles of one image to compress. ``compress_prob``: ``[tiles]`` p0 values."""
    count = int(compress_prob.shape[0])
    if mode is VirMode.OFF:
        return [False] * count
    if mode is VirMode.MAX:
        return [True] * count
    p0 = compress_prob.to(torch.float32)
    cutoff = torch.quantile(p0, relative_threshold)
    return ((p0 > cutoff) & (p0 >= absolute_threshold)).tolist()

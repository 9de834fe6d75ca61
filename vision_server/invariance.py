"""Batch invariance: a tile's rows and router p0 never depend on what shares its forward pass.

Kernels pick their reduction order from the shapes of their operands: a CPU BLAS computes a
one-row product as a dot product and a many-row one as a blocked GEMM; cuBLAS splits the
reduction (split-K, stream-K) by shape. So one tile computed in passes of different sizes can
round the last bit of its outputs differently. Most of the time that is invisible, but the
router compares p0 with a cut-off (a quantile over the request), and a tile at the cut-off
then gets 256 tokens under one load and 64 under another: a different prompt, a different
answer at temperature 0, a cache entry that depends on the load when it was filled.

The cure costs no new kernels: every pass is computed as consecutive **chunks of one fixed
number of tiles** (the last one padded). Every kernel then sees the same shapes whatever the
pass holds, and the bits of a tile depend on its pixels only.

- On the CPU a chunk is one tile: nothing is padded, and a tile never shares a product with
  another. Batching tiles buys nothing there (a tile's products are already large; measured
  in docs/benchmarks.md section 9).
- On CUDA a chunk is ``CUDA_CHUNK_TILES`` tiles, and cuBLAS runs without split-K (one
  shape-independent reduction order per output, so a tile's position in its chunk does not
  matter either); see ``use_deterministic_cuda_kernels``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch

from vision_server.model.encoder import TileEmbeddings

Forward = Callable[[torch.Tensor], TileEmbeddings]  # [n, 3, H, W] tiles -> per-tile outputs
BatchInvariance = Literal["auto", "on", "off"]

CPU_CHUNK_TILES = 1
# Small enough that a lone image pays little padding, large enough for the GPU's products to
# stay efficient (an H100 encodes about 0.93x as many tiles/s at batch 8 as at batch 32).
CUDA_CHUNK_TILES = 8


def chunk_tiles(setting: BatchInvariance, device: torch.device) -> int:
    """Tiles per fixed-shape chunk for ``--batch-invariant`` on ``device`` (0: off, passes
    run in one piece). ``auto`` is on for the CPU and off for CUDA."""
    on = setting == "on" or (setting == "auto" and device.type != "cuda")
    if not on:
        return 0
    return CUDA_CHUNK_TILES if device.type == "cuda" else CPU_CHUNK_TILES


def use_deterministic_cuda_kernels() -> None:
    """cuBLAS without split-K and without reduced-precision reductions, so that one output
    element is reduced in the same order in every product of a given shape (call before the
    first CUDA product: cuBLAS reads its workspace settings when it starts). A workspace
    this small leaves cuBLASLt no room for split-K partial sums."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    os.environ["CUBLASLT_WORKSPACE_SIZE"] = "1"  # KiB
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def chunked(forward: Forward, chunk: int) -> Forward:
    """``forward`` over consecutive chunks of exactly ``chunk`` tiles, the last one padded
    with blank tiles whose outputs are dropped; the outputs are those of the pass's tiles, in
    order."""

    def run(tiles: torch.Tensor) -> TileEmbeddings:
        count = int(tiles.shape[0])
        pieces = []
        for start in range(0, count, chunk):
            piece = tiles[start : start + chunk]
            if piece.shape[0] < chunk:
                blank = piece.new_zeros((chunk - piece.shape[0], *piece.shape[1:]))
                piece = torch.cat([piece, blank])
            pieces.append(forward(piece))
        if len(pieces) == 1 and count == chunk:
            return pieces[0]
        return _concatenate(pieces, count)

    return run


def _concatenate(pieces: list[TileEmbeddings], count: int) -> TileEmbeddings:
    def rows(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        if parts[0] is None:
            return None
        return torch.cat([p for p in parts if p is not None])[:count]

    full = rows([p.full for p in pieces])
    assert full is not None
    return TileEmbeddings(
        full,
        rows([p.compressed for p in pieces]),
        rows([p.compress_prob for p in pieces]),
    )

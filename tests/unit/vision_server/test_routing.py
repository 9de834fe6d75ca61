"""The Visual Resolution Router's decision rule, on hand-worked cases.

The published Flash model (``generate_flash``) compresses a tile when
``p0 > quantile(p0 over all tiles of the call, relative)`` and ``p0 >= absolute``, the quantile
taken in float32 and both comparisons made in the gate's dtype. Each case below states its
arithmetic; none recomputes the rule.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import encode_image
from PIL import Image

from protos.options import VirMode
from vision_server.routing import route_tiles

BF16 = torch.bfloat16


def decide(p0: list[float], relative: float, absolute: float, dtype=torch.float32) -> list[bool]:
    return route_tiles(torch.tensor(p0, dtype=dtype), VirMode.AUTO, relative, absolute)


def test_ties_at_the_cut_off_are_kept():
    # Sorted [0.2, 0.5, 0.5, 0.9]; the 0.5 quantile sits at position 1.5, between the two
    # 0.5s: the cut-off is 0.5, and "above the cut-off" is strict.
    assert decide([0.5, 0.9, 0.2, 0.5], 0.5, 0.0) == [False, True, False, False]
    # All equal: nothing is above the cut-off, whatever the quantile.
    assert decide([0.6, 0.6, 0.6], 0.0, 0.0) == [False, False, False]
    assert decide([0.6, 0.6, 0.6], 0.9, 0.0) == [False, False, False]


def test_interpolated_cut_off_and_the_absolute_floor():
    # Sorted [0.1, 0.3, 0.7]: the 0.25 quantile is 0.1 + 0.5 * (0.3 - 0.1) = 0.2.
    assert decide([0.7, 0.1, 0.3], 0.25, 0.0) == [True, False, True]
    # The same, with an absolute floor of 0.5: only 0.7 clears both.
    assert decide([0.7, 0.1, 0.3], 0.25, 0.5) == [True, False, False]
    # The floor is inclusive: 0.3 >= 0.3.
    assert decide([0.7, 0.1, 0.3], 0.25, 0.3) == [True, False, True]


def test_bf16_rounds_the_absolute_threshold():
    # 0.7 is not a bfloat16 number; its nearest is 0.69921875 (0x3F33). A tile with exactly that
    # p0 passes ">= 0.7" in bfloat16 (the threshold rounds down onto it), not in float32.
    assert torch.tensor(0.7, dtype=BF16).item() == 0.69921875
    assert decide([0.25, 0.69921875], 0.0, 0.7, dtype=BF16) == [False, True]
    assert decide([0.25, 0.69921875], 0.0, 0.7, dtype=torch.float32) == [False, False]


def test_bf16_rounds_the_cut_off():
    # Sorted [0.5, 0.50390625, 0.50390625] (neighbouring bfloat16 numbers); the 0.4 quantile
    # in float32 is 0.5 + 0.8 * 0.00390625 = 0.503125, which rounds up to 0.50390625 in
    # bfloat16: the two upper tiles are then not *above* it. In float32 they are.
    p0 = [0.50390625, 0.5, 0.50390625]
    assert decide(p0, 0.4, 0.0, dtype=BF16) == [False, False, False]
    assert decide(p0, 0.4, 0.0, dtype=torch.float32) == [True, False, True]


def test_fixed_modes_ignore_p0():
    p0 = torch.tensor([0.9, 0.1])
    assert route_tiles(p0, VirMode.OFF, 0.0, 0.0) == [False, False]
    assert route_tiles(p0, VirMode.MAX, 1.0, 1.0) == [True, True]


# ---- the request is the unit ----------------------------------------------------------------

# Grey level of a flat one-tile image -> the p0 its tile is given (injected below).
P0_OF_LEVEL = {200: 0.9, 50: 0.1, 120: 0.3}


def flat(level: int) -> bytes:
    return encode_image(Image.fromarray(np.full((448, 448, 3), level, dtype=np.uint8)))


@pytest.fixture(scope="module")
def routed_pipeline(tiny_flash_models: dict[str, Path]):
    """The real pipeline on the tiny Flash checkpoint, whose router is replaced by a table of
    p0 per grey level, so the cases can be worked by hand (thresholds: relative 0.5, absolute
    0.05, from the checkpoint)."""
    from vision_server.server import build_pipeline
    from vision_server.settings import VisionSettings

    settings = VisionSettings(model=str(tiny_flash_models["hf"]))  # type: ignore[call-arg]
    pipeline, _ = build_pipeline(settings)
    flash = pipeline.spec.flash
    assert flash is not None
    assert (flash.relative_threshold, flash.absolute_threshold) == (0.5, 0.05)
    encoder = pipeline.engine.encoder
    real_forward = encoder.forward
    mean, std = pipeline.spec.image_mean[0], pipeline.spec.image_std[0]

    def forward(tiles: torch.Tensor):  # [n, 3, 448, 448], normalised
        out = real_forward(tiles)
        levels = torch.round((tiles[:, 0, 0, 0].double() * std + mean) * 255).int().tolist()
        out.compress_prob = torch.tensor([P0_OF_LEVEL.get(v, 0.0) for v in levels])
        return out

    encoder.forward = forward  # type: ignore[method-assign]
    yield pipeline
    pipeline.close()


def encode(pipeline, images: list[bytes], vir: VirMode = VirMode.AUTO):
    from protos.messages import EncodeCall, EncodeOptions, ImageInput

    async def run():
        pipeline.engine.start()
        try:
            call = EncodeCall([ImageInput(data) for data in images], (), EncodeOptions(vir=vir))
            return [encoded async for encoded in pipeline.encode(call)]
        finally:
            await pipeline.engine.batcher.stop()

    # A fresh batcher per event loop: the test drives the engine from asyncio.run.
    from vision_server.batching import TileBatcher

    engine = pipeline.engine
    engine.batcher = TileBatcher(
        engine.run_pass,
        max_batch_tiles=8,
        max_wait_ms=5,
        max_queued_tiles=64,
        max_queued_bytes=1 << 30,
    )
    return asyncio.run(run())


def test_one_tile_images_inside_a_multi_image_request(routed_pipeline):
    # Request p0 [0.9, 0.1, 0.3]: the 0.5 quantile is 0.3, so only the 0.9 tile is above it
    # (and above 0.05): image 0 is compressed although it has a single tile.
    together = encode(routed_pipeline, [flat(200), flat(50), flat(120)])
    assert [e.tokens_per_tile for e in together] == [[64], [256], [256]]
    assert [e.num_visual_tokens for e in together] == [64, 256, 256]
    # Alone, a one-tile image is its own quantile and never above it.
    (alone,) = encode(routed_pipeline, [flat(200)])
    assert alone.tokens_per_tile == [256]
    # The compressed image's rows are its 64-token rows; the others their 256-token rows,
    # bit for bit although a 1-tile pass and a 3-tile pass are compared (batch invariance).
    (as_max,) = encode(routed_pipeline, [flat(200)], VirMode.MAX)
    (as_off,) = encode(routed_pipeline, [flat(50)], VirMode.OFF)
    assert torch.equal(together[0].embeddings, as_max.embeddings)
    assert torch.equal(together[1].embeddings, as_off.embeddings)

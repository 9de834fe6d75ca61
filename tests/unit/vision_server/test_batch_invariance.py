"""Batch invariance: a tile's rows and router p0 are the same bits whatever shares its pass.

Unit level: the engine's pass (the real tiny Flash encoder, on the CPU) over random pass
compositions against each tile encoded alone. Service level: a few hundred generated images of
random sizes, encoded each request alone and then all at once in random concurrent mixes,
through the real vision servers of both checkpoint layouts (one takes an idle image in parts,
the other in one piece), with the router in ``auto`` and ``max``.
"""

from __future__ import annotations

import random
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import encode_image, encode_over_grpc, same_pixels_other_file, start_vision_server
from PIL import Image

from protos.dvd.v1 import vision_pb2
from protos.messages import RowSelection
from vision_server.batching import PassSlice
from vision_server.cuda_graphs import graph_batch_sizes
from vision_server.data_path import SliceOutput
from vision_server.engine import EncoderEngine
from vision_server.invariance import CPU_CHUNK_TILES, CUDA_CHUNK_TILES, chunk_tiles, chunked


@pytest.fixture(scope="module")
def flash_engine(tiny_flash_models: dict[str, Path]) -> EncoderEngine:
    from checkpoints.spec import load_checkpoint_spec
    from vision_server.model.encoder import VisionEncoder

    spec = load_checkpoint_spec(tiny_flash_models["hf"])
    device = torch.device("cpu")
    encoder = VisionEncoder.from_checkpoint(spec, device, torch.float32)
    return EncoderEngine(
        encoder,
        device,
        torch.float32,
        max_batch_tiles=16,
        max_wait_ms=0,
        max_queued_tiles=64,
        invariant_chunk_tiles=chunk_tiles("auto", device),
    )


def _tiles(count: int, seed: int) -> torch.Tensor:
    """Random tiles, with repeats (the same pixels at several positions) and flat ones."""
    generator = torch.Generator().manual_seed(seed)
    tiles = torch.randint(0, 256, (count, 3, 448, 448), generator=generator, dtype=torch.uint8)
    tiles[3] = tiles[1]
    tiles[5] = 128
    tiles[8] = 128
    return tiles


def _routed(engine: EncoderEngine, slices: list[torch.Tensor]) -> list[SliceOutput]:
    """One pass over ``slices`` (one image each), every image wanting routed rows."""
    launched = engine.run_pass([PassSlice(t, RowSelection.ROUTED) for t in slices])
    return list(launched.wait())


def test_a_tile_gets_the_same_bits_in_any_pass(flash_engine):
    """p0, the 256-token and the 64-token rows of every tile, in 16 random passes of 2 to 16
    tiles (random tiles, random order, split into random slices), equal those of the tile
    encoded alone, bit for bit; tiles with the same pixels get the same bits wherever they
    sit."""
    tiles = _tiles(12, seed=0)
    with torch.inference_mode():
        alone = [_routed(flash_engine, [tiles[i : i + 1]])[0] for i in range(len(tiles))]
    assert torch.equal(alone[1].compress_prob, alone[3].compress_prob)
    assert torch.equal(alone[5].full, alone[8].full)
    rng = random.Random(1)
    for _ in range(16):
        order = [rng.randrange(len(tiles)) for _ in range(rng.randint(2, 16))]
        cuts = sorted(rng.sample(range(1, len(order)), rng.randint(0, min(3, len(order) - 1))))
        bounds = [0, *cuts, len(order)]
        slices = [tiles[order[a:b]] for a, b in zip(bounds, bounds[1:], strict=False)]
        with torch.inference_mode():
            outputs = _routed(flash_engine, slices)
        position = 0
        for output in outputs:
            assert output.full is not None and output.compressed is not None
            assert output.compress_prob is not None
            for k in range(output.full.shape[0]):
                reference = alone[order[position]]
                assert torch.equal(output.compress_prob[k : k + 1], reference.compress_prob)
                assert torch.equal(output.full[k : k + 1], reference.full)
                assert torch.equal(output.compressed[k : k + 1], reference.compressed)
                position += 1
        assert position == len(order)


def test_chunks_are_padded_and_the_padding_dropped():
    """A chunk of 3 over 7 tiles: three forwards of exactly 3 tiles (the last with 2 blank
    tiles), and the outputs of the 7 tiles only, in order."""
    from vision_server.model.encoder import TileEmbeddings

    shapes: list[int] = []

    def forward(tiles: torch.Tensor) -> TileEmbeddings:
        shapes.append(int(tiles.shape[0]))
        level = tiles[:, 0, 0, 0].float()  # [n]: each tile's identity, or 0 for padding
        return TileEmbeddings(
            level[:, None, None].expand(-1, 4, 2), level[:, None, None].expand(-1, 1, 2), level
        )

    tiles = torch.arange(1, 8, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2)
    out = chunked(forward, 3)(tiles)
    assert shapes == [3, 3, 3]
    assert out.compress_prob is not None and out.compressed is not None
    assert out.compress_prob.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert out.full.shape == (7, 4, 2) and out.compressed.shape == (7, 1, 2)
    assert out.full[:, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    shapes.clear()
    assert chunked(forward, 3)(tiles[:3]).compress_prob.tolist() == [1, 2, 3]
    assert shapes == [3]


def test_chunk_size_by_device_and_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_tiles("auto", cpu) == CPU_CHUNK_TILES == 1
    assert chunk_tiles("auto", cuda) == 0  # off on CUDA until measured there
    assert chunk_tiles("on", cuda) == CUDA_CHUNK_TILES
    assert chunk_tiles("on", cpu) == 1
    assert chunk_tiles("off", cpu) == chunk_tiles("off", cuda) == 0


def test_cuda_graph_sizes_are_whole_chunks():
    assert graph_batch_sizes(32, 8) == [8, 16, 24, 32]
    assert graph_batch_sizes(30, 8) == [8, 16, 24, 32]  # a pass of 30 replays 32: 4 chunks
    assert graph_batch_sizes(5, 8) == [8]
    assert graph_batch_sizes(3, 1) == [1, 2, 3]


# ---- the running service ------------------------------------------------------------------


def _generated_image(rng: np.random.Generator) -> Image.Image:
    """A random size up to 1100x1100, one flat colour with up to three blocks of noise: many
    tiles with the same pixels (exact p0 ties), and p0 spread over its range."""
    width, height = (int(v) for v in rng.integers(64, 1100, size=2))
    pixels = np.full((height, width, 3), rng.integers(0, 256, size=3), dtype=np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(8, 400)), int(rng.integers(8, 400))
        block = pixels[y : y + h, x : x + w]
        block[:] = rng.integers(0, 256, size=block.shape, dtype=np.uint8)
    return Image.fromarray(pixels)


def _batch_tile_buckets(metrics_url: str) -> dict[str, float]:
    """dvd:vision_batch_tiles histogram buckets: upper bound -> passes of at most that many."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    pattern = r'^dvd:vision_batch_tiles_bucket\{le="([^"]+)"\}\s+([0-9.eE+-]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


Request = tuple[list[bytes], int, int]  # images, max_tiles, router mode


def generated_requests(count: int, seed: int) -> list[Request]:
    """``count`` requests of 1 to 3 generated images, each with its own ``max_tiles`` (1 to
    6) and router mode (``auto`` and ``max`` in turn)."""
    rng = np.random.default_rng(seed)
    requests = []
    for index in range(count):
        images = [encode_image(_generated_image(rng)) for _ in range(int(rng.integers(1, 4)))]
        mode = vision_pb2.VIR_MODE_AUTO if index % 2 == 0 else vision_pb2.VIR_MODE_MAX
        requests.append((images, int(rng.integers(1, 7)), mode))
    return requests


def assert_load_invariant(target: str, metrics_url: str, requests: list[Request]) -> list:
    """Encode every request alone (one at a time), then all of them again at once from 12
    threads in a random order, as other files with the same pixels (so that no embedding
    cache answers); require the same router decisions and the same bits, and that the
    concurrent round really shared passes. Returns the replies of the first round."""

    def encode(index: int, images: list[bytes]) -> list:
        _, max_tiles, mode = requests[index]
        return encode_over_grpc(
            target, images, max_tiles=max_tiles, vir_mode=mode, request_id=f"inv-{index}"
        )

    alone = [encode(i, images) for i, (images, _, _) in enumerate(requests)]
    before = _batch_tile_buckets(metrics_url)
    again = [[same_pixels_other_file(data, "busy") for data in r[0]] for r in requests]
    order = list(range(len(requests)))
    random.Random(len(requests)).shuffle(order)
    with ThreadPoolExecutor(max_workers=12) as pool:
        futures = {i: pool.submit(encode, i, again[i]) for i in order}
        busy = {i: future.result() for i, future in futures.items()}
    after = _batch_tile_buckets(metrics_url)
    larger = (after["+Inf"] - after["2.0"]) - (before["+Inf"] - before["2.0"])
    assert larger >= 10, "the concurrent round should share passes of more than 2 tiles"
    compressed = kept = 0
    for index, replies in enumerate(alone):
        for one, other in zip(replies, busy[index], strict=True):
            assert not other.header.from_cache
            assert list(other.header.tokens_per_tile) == list(one.header.tokens_per_tile), index
            assert torch.equal(other.embeddings, one.embeddings), index
            compressed += list(one.header.tokens_per_tile).count(64)
            kept += list(one.header.tokens_per_tile).count(256)
    assert compressed > 50 and kept > 50  # both kinds of rows were compared
    return alone


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_rows_and_decisions_do_not_depend_on_the_load(flash_vision, layout):
    """120 generated images per layout in 60 requests: the same decisions and bits alone and
    in random concurrent mixes. The "original" server takes an idle image in parts (a pass
    for its grid, one for its thumbnail), the "hf" one in one piece."""
    target, metrics_url = flash_vision[layout]
    assert_load_invariant(target, metrics_url, generated_requests(60, seed=24 + len(layout)))


@pytest.mark.gpu
@pytest.mark.processes
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batch_invariant_on_cuda_in_bfloat16(tiny_flash_models, log_dir):
    """``--batch-invariant on`` with CUDA graphs in bfloat16: the same property, and the same
    bits as a server that runs every pass eagerly."""
    requests = generated_requests(60, seed=33)
    replies = []
    for graphs in ("--cuda-graphs", "--no-cuda-graphs"):
        server, target = start_vision_server(
            f"invariant-cuda{graphs.removeprefix('-')}",
            tiny_flash_models["hf"],
            log_dir,
            extra_args=["--device", "cuda", "--batch-invariant", "on", graphs],
        )
        try:
            replies.append(assert_load_invariant(target, str(server.metrics_url), requests))
        finally:
            server.stop()
    for graphed, eager in zip(*replies, strict=True):
        for one, other in zip(graphed, eager, strict=True):
            assert one.embeddings.dtype == torch.bfloat16
            assert list(one.header.tokens_per_tile) == list(other.header.tokens_per_tile)
            assert torch.equal(one.embeddings, other.embeddings)

"""The real vision server (gRPC, separate process) against transformers' InternVL.

The oracle is independent of our code: transformers' image processor (GotOcr2, PIL backend)
prepares the tiles and ``InternVLForConditionalGeneration.model.get_image_features`` encodes
them, on the same tiny checkpoint.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from helpers import (
    encode_image,
    encode_over_grpc,
    gradient_image,
    noise_image,
    same_pixels_other_file,
)

from protos.dvd.v1 import vision_pb2, vision_pb2_grpc

# (width, height): one tile; multi-tile + thumbnail; odd aspect ratios; a tiny image.
REFERENCE_SIZES = [(448, 448), (700, 300), (1000, 150), (150, 900), (333, 777), (50, 30)]


def oracle_features(oracle, image) -> torch.Tensor:
    model, processor = oracle
    pixel_values = processor(image, crop_to_patches=True, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return features.reshape(-1, features.shape[-1])  # [tiles * 256, hidden]


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("size", REFERENCE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_embeddings_match_transformers(vision_targets, oracle, layout, size):
    image = noise_image(*size, seed=size[0] * 7 + size[1])
    (reply,) = encode_over_grpc(vision_targets[layout], [encode_image(image)])
    expected = oracle_features(oracle, image)
    assert reply.embeddings.shape == expected.shape
    assert reply.header.num_visual_tokens == expected.shape[0]
    assert reply.header.num_tiles * 256 == expected.shape[0]
    assert list(reply.header.tokens_per_tile) == [256] * reply.header.num_tiles
    assert reply.embeddings.dtype == torch.float32
    max_abs = (reply.embeddings - expected).abs().max().item()
    assert max_abs <= 1e-4, f"max abs difference {max_abs}"
    # The comparison is meaningful: features are far from zero and vary from row to row.
    assert expected.abs().mean() > 0.1
    assert expected.std(dim=0).mean() > 0.1


def test_layouts_give_identical_embeddings(vision_targets):
    data = encode_image(gradient_image(900, 500, seed=3), "JPEG")
    (hf,) = encode_over_grpc(vision_targets["hf"], [data])
    (original,) = encode_over_grpc(vision_targets["original"], [data])
    assert torch.equal(hf.embeddings, original.embeddings)


def test_header_describes_the_tiling(vision_targets):
    (reply,) = encode_over_grpc(vision_targets["hf"], [encode_image(noise_image(700, 300, 1))])
    header = reply.header
    assert (header.grid_columns, header.grid_rows, header.has_thumbnail) == (5, 2, True)
    assert header.num_tiles == 11
    assert header.hidden_size == 128
    assert header.dtype == vision_pb2.DTYPE_FLOAT32
    assert header.num_bytes == 11 * 256 * 128 * 4


def test_max_tiles_option(vision_targets):
    data = encode_image(noise_image(1000, 150, 2))
    (reply,) = encode_over_grpc(vision_targets["hf"], [data], max_tiles=2)
    assert (reply.header.grid_columns, reply.header.grid_rows) == (2, 1)
    assert reply.header.num_tiles == 3  # 2 + thumbnail
    (single,) = encode_over_grpc(vision_targets["hf"], [data], max_tiles=1)
    assert single.header.num_tiles == 1


def test_several_images_stream_in_order(vision_targets, oracle):
    images = [noise_image(448, 448, 10), noise_image(896, 448, 11), noise_image(300, 600, 12)]
    replies = encode_over_grpc(vision_targets["hf"], [encode_image(i) for i in images])
    assert [r.header.image_index for r in replies] == [0, 1, 2]
    for image, reply in zip(images, replies, strict=True):
        assert (reply.embeddings - oracle_features(oracle, image)).abs().max() <= 1e-4


def test_concurrent_requests_get_exactly_their_own_embeddings(vision_targets):
    """Requests of different sizes share forward passes (batch cap 8 tiles) without effect."""
    target = vision_targets["hf"]
    sizes = [
        (448, 448),
        (700, 300),
        (1000, 150),
        (150, 900),
        (896, 448),
        (50, 30),
        (1200, 900),
        (640, 480),
    ]
    payloads = [encode_image(noise_image(w, h, seed=100 + i)) for i, (w, h) in enumerate(sizes)]
    alone = [encode_over_grpc(target, [p])[0].embeddings for p in payloads]
    for round_ in range(2):
        # The same pictures as other files, so that they are encoded again, not served from
        # the embedding cache.
        again = [same_pixels_other_file(p, f"round-{round_}") for p in payloads]
        with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
            replies = list(pool.map(lambda p: encode_over_grpc(target, [p])[0], again))
        assert not any(reply.header.from_cache for reply in replies)
        for solo, shared in zip(alone, replies, strict=True):
            assert torch.equal(solo, shared.embeddings)


def test_model_info(vision_targets, tiny_models):
    with grpc.insecure_channel(vision_targets["original"]) as channel:
        info = vision_pb2_grpc.VisionServiceStub(channel).GetModelInfo(
            vision_pb2.GetModelInfoRequest()
        )
    assert info.model_id == str(tiny_models["original"])
    assert info.checkpoint_layout == "original"
    assert info.hidden_size == 128
    assert info.tokens_per_tile == 256
    assert info.tile_size == 448
    assert info.default_max_tiles == 12
    assert (info.image_start_token, info.image_context_token, info.image_end_token) == (
        "<img>",
        "<IMG_CONTEXT>",
        "</img>",
    )


BAD_REQUESTS = [
    ([b""], "image is empty"),
    ([b"definitely not an image"], "cannot decode image"),
    ([encode_image(noise_image(64, 64, 0))[:100]], "cannot decode image"),  # truncated PNG
    ([encode_image(noise_image(64, 64, 0), "ICO")], "format ICO is not accepted"),
    ([], "no images"),
    ([encode_image(noise_image(8, 8, 0))] * 17, "17 images in one request"),
]


@pytest.mark.parametrize(("images", "message"), BAD_REQUESTS, ids=lambda v: str(v)[:30])
def test_bad_images_are_invalid_argument_and_server_survives(vision_targets, images, message):
    target = vision_targets["hf"]
    with pytest.raises(grpc.RpcError) as caught:
        encode_over_grpc(target, images)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    # Still serving, and still correct.
    (reply,) = encode_over_grpc(target, [encode_image(noise_image(448, 448, 5))])
    assert reply.header.num_tiles == 1


def test_bad_image_among_good_ones_names_its_index(vision_targets):
    good = encode_image(noise_image(100, 100, 1))
    with pytest.raises(grpc.RpcError) as caught:
        encode_over_grpc(vision_targets["hf"], [good, b"junk"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1:" in caught.value.details()


def test_decompression_bomb_refused_before_decoding(vision_targets):
    # A 10000x10000 PNG of one colour compresses to a few hundred KB but is 100 Mpixels.
    from PIL import Image

    bomb = encode_image(Image.new("RGB", (10000, 10000), (10, 20, 30)))
    assert len(bomb) < 1_000_000
    with pytest.raises(grpc.RpcError) as caught:
        encode_over_grpc(vision_targets["hf"], [bomb])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pixels" in caught.value.details()


def test_too_many_tiles_requested(vision_targets):
    with pytest.raises(grpc.RpcError) as caught:
        encode_over_grpc(
            vision_targets["hf"], [encode_image(noise_image(64, 64, 0))], max_tiles=1000
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tiles=1000" in caught.value.details()


def test_queued_tiles_gauge_follows_the_queue(tiny_models):
    """dvd:vision_queued_tiles (the autoscaling signal in docs/deploy.md) counts the tiles
    waiting for a pass: checked on an engine whose batcher is not running, so they stay."""
    import asyncio

    from prometheus_client import REGISTRY

    from checkpoints.spec import load_checkpoint_spec
    from vision_server.engine import EncoderEngine
    from vision_server.model.encoder import VisionEncoder

    def queued() -> float | None:
        return REGISTRY.get_sample_value("dvd:vision_queued_tiles")

    spec = load_checkpoint_spec(tiny_models["hf"])
    encoder = VisionEncoder.from_checkpoint(spec, torch.device("cpu"), torch.float32)
    engine = EncoderEngine(
        encoder,
        torch.device("cpu"),
        torch.float32,
        max_batch_tiles=8,
        max_wait_ms=0,
        max_queued_tiles=64,
    )

    async def scenario() -> list[float | None]:
        seen = [queued()]
        waiting = asyncio.create_task(engine.batcher.submit(torch.zeros(3, 3, 448, 448)))
        for _ in range(1000):  # until the task has queued its tiles (it has not yielded yet)
            if queued() != seen[0] or waiting.done():
                break
            await asyncio.sleep(0.001)
        seen.append(queued())
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        seen.append(queued())
        return seen

    assert asyncio.run(scenario()) == [0.0, 3.0, 0.0]

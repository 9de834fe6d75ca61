"""Visual Resolution Router (InternVL3.5-Flash) in the running vision service.

References are computed here, independently of DvD's model code: ViT features from
transformers' InternVL, pixel shuffle from transformers, and the router and ``mlp2`` as plain
torch functional ops on the checkpoint's tensors, following the published Flash model.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import router_reference
import torch
import torch.nn.functional as F
from helpers import encode_image, encode_over_grpc, noise_image, same_pixels_other_file
from PIL import Image
from router_reference import compress_prob as reference_compress_prob
from safetensors.torch import load_file

from protos.dvd.v1 import vision_pb2

FLAT = (128, 128, 128)


def flat_and_stripes(width: int, height: int, stripe_regions: list[tuple[int, int]]) -> Image.Image:
    """A flat grey image with dense vertical stripes in the given x-ranges."""
    pixels = np.full((height, width, 3), FLAT, dtype=np.uint8)
    for start, end in stripe_regions:
        columns = np.arange(start, end)
        pixels[:, start:end] = np.where((columns // 2) % 2 == 0, 255, 0)[None, :, None]
    return Image.fromarray(pixels)


ROUTED_IMAGES = [
    flat_and_stripes(1344, 448, [(448, 896)]),  # flat | stripes | flat (+ thumbnail)
    flat_and_stripes(1792, 448, [(0, 448), (1344, 1792)]),  # stripes | flat | flat | stripes
    flat_and_stripes(896, 896, [(0, 448)]),  # 2x2: striped left column, flat right column
    noise_image(900, 600, seed=9),
]


@pytest.fixture(scope="module")
def flash_weights(tiny_flash_models) -> dict[str, torch.Tensor]:
    weights = load_file(str(tiny_flash_models["original"] / "model.safetensors"))
    return {
        k: v
        for k, v in weights.items()
        if k.startswith(("mlp2.", "pooling_before_gating.", "gating."))
    }


@pytest.fixture(scope="module")
def flash_thresholds(tiny_flash_models) -> tuple[float, float]:
    import json

    config = json.loads((tiny_flash_models["original"] / "config.json").read_text())
    assert config["flash_mode"] is True
    return config["flash_relative_threshold"], config["flash_absolute_threshold"]


def vit_features(oracle, image: Image.Image) -> torch.Tensor:
    """transformers' ViT features of an image's tiles: ``[n, 1024, D]``."""
    return router_reference.vit_features(oracle, router_reference.image_tiles(oracle, image))


def reference_mlp2(oracle, weights, features: torch.Tensor) -> torch.Tensor:
    n, patches, width = features.shape
    side = int(patches**0.5)
    with torch.no_grad():
        shuffled = oracle[0].model.pixel_shuffle(
            features.reshape(n, side, side, width), scale_factor=0.25
        )
        x = shuffled.reshape(n, -1, shuffled.shape[-1])  # [n, 64, 16 D]
        x = F.layer_norm(x, (x.shape[-1],), weights["mlp2.0.weight"], weights["mlp2.0.bias"])
        x = F.gelu(F.linear(x, weights["mlp2.1.weight"], weights["mlp2.1.bias"]))
        x = F.gelu(F.linear(x, weights["mlp2.4.weight"], weights["mlp2.4.bias"]))
        return F.linear(x, weights["mlp2.7.weight"], weights["mlp2.7.bias"])  # [n, 64, llm]


def rule(p0: torch.Tensor, relative: float, absolute: float) -> list[bool]:
    return ((p0 > torch.quantile(p0, relative)) & (p0 >= absolute)).tolist()


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_vir_off_equals_the_non_flash_model(flash_vision, vision_targets, oracle, layout):
    image = noise_image(700, 300, seed=21)
    (flash,) = encode_over_grpc(
        flash_vision[layout][0], [encode_image(image)], vir_mode=vision_pb2.VIR_MODE_OFF
    )
    (plain,) = encode_over_grpc(vision_targets[layout], [encode_image(image)])
    assert list(flash.header.tokens_per_tile) == [256] * 11
    assert flash.header.vir_mode == vision_pb2.VIR_MODE_OFF
    assert torch.equal(flash.embeddings, plain.embeddings)
    model, processor = oracle
    pixel_values = processor(image, crop_to_patches=True, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    assert (flash.embeddings - expected.reshape(-1, expected.shape[-1])).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_max_uses_the_64_token_path(flash_vision, oracle, flash_weights, layout):
    image = noise_image(896, 448, seed=22)
    (reply,) = encode_over_grpc(
        flash_vision[layout][0], [encode_image(image)], vir_mode=vision_pb2.VIR_MODE_MAX
    )
    assert list(reply.header.tokens_per_tile) == [64, 64, 64]
    assert reply.header.num_visual_tokens == 192
    expected = reference_mlp2(oracle, flash_weights, vit_features(oracle, image))
    assert expected.shape == (3, 64, 128)
    assert (reply.embeddings - expected.reshape(-1, 128)).abs().max() <= 1e-4
    assert expected.std() > 0.1


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_router_decisions_follow_the_rule(
    flash_vision, oracle, flash_weights, flash_thresholds, layout
):
    relative, absolute = flash_thresholds
    mixed_decisions = 0
    for image in ROUTED_IMAGES:
        (reply,) = encode_over_grpc(
            flash_vision[layout][0], [encode_image(image)], vir_mode=vision_pb2.VIR_MODE_AUTO
        )
        features = vit_features(oracle, image)
        p0 = reference_compress_prob(flash_weights, features)
        expected = rule(p0, relative, absolute)
        assert [tokens == 64 for tokens in reply.header.tokens_per_tile] == expected, p0
        mixed_decisions += 0 < sum(expected) < len(expected)
        # The rows are the 64-token rows where compressed and the 256-token rows elsewhere.
        offset = 0
        compressed = reference_mlp2(oracle, flash_weights, features)
        for tile, squeeze in enumerate(expected):
            count = 64 if squeeze else 256
            rows = reply.embeddings[offset : offset + count]
            if squeeze:
                assert (rows - compressed[tile]).abs().max() <= 1e-4
            offset += count
        assert offset == reply.header.num_visual_tokens
    assert mixed_decisions >= 2  # the images really exercise the router


def test_router_decides_over_the_whole_request(
    flash_vision, oracle, flash_weights, flash_thresholds
):
    """The quantile spans every tile of every image of the call, as in the published
    ``generate_flash``: a one-tile image can be compressed next to others (alone it cannot)."""
    relative, absolute = flash_thresholds
    images = [ROUTED_IMAGES[0], noise_image(448, 448, seed=5)]
    replies = encode_over_grpc(flash_vision["hf"][0], [encode_image(i) for i in images])
    p0 = [reference_compress_prob(flash_weights, vit_features(oracle, i)) for i in images]
    expected = rule(torch.cat(p0), relative, absolute)
    got = [tokens == 64 for reply in replies for tokens in reply.header.tokens_per_tile]
    assert got == expected
    assert expected[-1]  # the one-tile image is compressed...
    assert rule(p0[1], relative, absolute) == [False]  # ...which it never is on its own
    (alone,) = encode_over_grpc(flash_vision["hf"][0], [encode_image(images[1])])
    assert list(alone.header.tokens_per_tile) == [256]


def test_threshold_override(flash_vision, oracle, flash_weights, flash_thresholds):
    relative, _ = flash_thresholds
    image = ROUTED_IMAGES[1]
    p0 = reference_compress_prob(flash_weights, vit_features(oracle, image))
    target = flash_vision["hf"][0]
    for threshold in (0.0, float(p0.median()), 1.0):
        (reply,) = encode_over_grpc(
            target,
            [encode_image(image)],
            vir_mode=vision_pb2.VIR_MODE_AUTO,
            vir_threshold=threshold,
        )
        assert [t == 64 for t in reply.header.tokens_per_tile] == rule(p0, relative, threshold)
    (nothing,) = encode_over_grpc(target, [encode_image(image)], vir_threshold=1.0)
    assert set(nothing.header.tokens_per_tile) == {256}


def test_routing_does_not_depend_on_the_batch(flash_vision):
    target = flash_vision["original"][0]
    probe = encode_image(ROUTED_IMAGES[0])
    alone = encode_over_grpc(target, [probe])[0]
    others = [encode_image(noise_image(448 * (1 + i % 3), 448, seed=300 + i)) for i in range(8)]
    # The same picture as another file: encoded again, not served from the embedding cache.
    probe_again = same_pixels_other_file(probe, "busy")
    with ThreadPoolExecutor(max_workers=9) as pool:
        futures = [pool.submit(encode_over_grpc, target, [payload]) for payload in others]
        busy = pool.submit(encode_over_grpc, target, [probe_again]).result()[0]
        for future in futures:
            future.result()
    assert not busy.header.from_cache
    assert list(busy.header.tokens_per_tile) == list(alone.header.tokens_per_tile)
    # Alone, this server takes the image in parts (a pass for its grid, one for its
    # thumbnail); busy, in one piece among others. Batch invariance: the same bits.
    tokens = list(alone.header.tokens_per_tile)
    assert 64 in tokens and 256 in tokens  # both kinds of rows are compared
    assert torch.equal(busy.embeddings, alone.embeddings)


def _one_textured_tile(grid: tuple[int, int]) -> Image.Image:
    """A flat image of ``grid`` 448-pixel tiles with stripes in its top-left tile only."""
    columns, rows = grid
    image = flat_and_stripes(448 * columns, 448 * rows, [])
    pixels = np.asarray(image).copy()
    pixels[:448, :448] = np.asarray(flat_and_stripes(448, 448, [(0, 448)]))
    return Image.fromarray(pixels)


def test_a_tile_at_the_cut_off_is_decided_the_same_alone_and_in_any_pass(
    flash_vision, oracle, flash_weights, flash_thresholds
):
    """Five identical flat tiles among seven (a 3x2 grid with one striped tile, and the
    thumbnail): the request's 0.5 quantile of p0 is exactly their p0, wherever the other two
    sort, so each of them ties the cut-off and is kept (``p0 > cut-off`` is false). That holds
    only if identical tiles get identical bits in every pass: alone (in parts), and in one
    piece among other requests' tiles, with the tied tiles in different passes."""
    relative, absolute = flash_thresholds
    assert relative == 0.5
    image = _one_textured_tile((3, 2))
    features = vit_features(oracle, image)
    assert features.shape[0] == 7
    p0 = torch.cat([reference_compress_prob(flash_weights, f[None]) for f in features])
    flat_p0 = p0[1:6]
    assert torch.equal(flat_p0, flat_p0[:1].expand(5))  # the construction: five exact ties
    assert torch.quantile(p0, relative) == flat_p0[0]
    expected = rule(p0, relative, absolute)
    assert expected[1:6] == [False] * 5
    target = flash_vision["original"][0]
    probe = encode_image(image)
    (alone,) = encode_over_grpc(target, [probe])
    assert [t == 64 for t in alone.header.tokens_per_tile] == expected
    others = [encode_image(noise_image(448 * (1 + i % 4), 448, seed=400 + i)) for i in range(6)]
    for round_ in range(3):  # different pass compositions each round
        with ThreadPoolExecutor(max_workers=7) as pool:
            futures = [pool.submit(encode_over_grpc, target, [o]) for o in others[round_:]]
            probe_again = same_pixels_other_file(probe, f"busy-{round_}")
            busy = pool.submit(encode_over_grpc, target, [probe_again]).result()[0]
            for future in futures:
                future.result()
        assert not busy.header.from_cache
        assert list(busy.header.tokens_per_tile) == list(alone.header.tokens_per_tile)
        assert torch.equal(busy.embeddings, alone.embeddings)


def test_non_flash_checkpoint(vision_targets):
    data = encode_image(noise_image(896, 448, seed=23))
    (auto,) = encode_over_grpc(vision_targets["hf"], [data], vir_mode=vision_pb2.VIR_MODE_AUTO)
    assert set(auto.header.tokens_per_tile) == {256}
    assert auto.header.vir_mode == vision_pb2.VIR_MODE_UNSPECIFIED  # no router was applied
    with pytest.raises(grpc.RpcError) as caught:
        encode_over_grpc(vision_targets["hf"], [data], vir_mode=vision_pb2.VIR_MODE_MAX)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "InternVL3.5-Flash" in caught.value.details()


def test_invalid_threshold_is_refused(flash_vision):
    with pytest.raises(grpc.RpcError) as caught:
        encode_over_grpc(
            flash_vision["hf"][0], [encode_image(noise_image(64, 64, 1))], vir_threshold=1.5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([\w:]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if (
            match
            and match.group(1) == name
            and all(f'{k}="{v}"' in (match.group(2) or "") for k, v in labels.items())
        ):
            total += float(match.group(3))
    return total


def test_routing_metrics(flash_vision):
    target, metrics_url = flash_vision["hf"]
    before = httpx.get(metrics_url, timeout=5).text
    (reply,) = encode_over_grpc(target, [encode_image(ROUTED_IMAGES[1])])
    after = httpx.get(metrics_url, timeout=5).text
    compressed = sum(1 for t in reply.header.tokens_per_tile if t == 64)
    kept = len(reply.header.tokens_per_tile) - compressed
    assert compressed > 0 and kept > 0

    def delta(name: str, **labels: str) -> float:
        return _counter(after, name, **labels) - _counter(before, name, **labels)

    assert delta("dvd:vision_tiles_total", route="compress") == compressed
    assert delta("dvd:vision_tiles_total", route="keep") == kept
    assert delta("dvd:vision_tokens_saved_total") == compressed * (256 - 64)
    assert delta("dvd:vision_visual_tokens_total") == reply.header.num_visual_tokens
    assert delta("dvd:vision_requests_total", status="OK") == 1


def test_a_videos_frames_are_routed_together(flash_vision, oracle, flash_weights, flash_thresholds):
    """A video's frames (one tile each) are routed as one unit, with the request's other
    tiles, as ``generate_flash`` routes all pixel values of a call: alone, a one-tile frame
    could never be compressed."""
    from helpers import encode_video, mixed_frames
    from reference import load_video_frames

    relative, absolute = flash_thresholds
    model, processor = oracle
    video = encode_video(mixed_frames(24, seed=7))
    frames, indices = load_video_frames(video, 16)
    pixel_values = processor(frames, crop_to_patches=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
    p0 = reference_compress_prob(flash_weights, features)
    expected = rule(p0, relative, absolute)
    assert 0 < sum(expected) < len(expected)

    (reply,) = encode_over_grpc(flash_vision["original"][0], [], videos=[(video, 16)])
    assert [tokens == 64 for tokens in reply.header.tokens_per_tile] == expected
    assert list(reply.header.video.frame_numbers) == indices
    assert reply.header.video.total_frames == 24
    compressed = reference_mlp2(oracle, flash_weights, features)
    offset = 0
    for frame, squeeze in enumerate(expected):
        count = 64 if squeeze else 256
        if squeeze:
            rows = reply.embeddings[offset : offset + count]
            assert (rows - compressed[frame]).abs().max() <= 1e-4
        offset += count
    assert offset == reply.header.num_visual_tokens

    # With an image in the same call, the quantile spans the image's tiles and the frames.
    image = ROUTED_IMAGES[0]
    replies = encode_over_grpc(flash_vision["hf"][0], [encode_image(image)], videos=[(video, 16)])
    image_p0 = reference_compress_prob(flash_weights, vit_features(oracle, image))
    together = rule(torch.cat([image_p0, p0]), relative, absolute)
    got = [tokens == 64 for r in replies for tokens in r.header.tokens_per_tile]
    assert got == together
    assert not replies[0].header.HasField("video") and replies[1].header.video.video_index == 0

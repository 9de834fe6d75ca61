"""``max_visual_tokens`` end to end: the real services on the tiny Flash checkpoint (and on the
plain one, which has no router), over HTTP and over the vision service's gRPC.

The expected choice of tiles is brute-forced here from an independent router
(``router_reference``: transformers' ViT, the checkpoint's router tensors as plain torch ops):
of all sets of tiles to compress, the smallest that fits the budgets, and of those the one with
the highest p0 (the tests pick images whose p0 are far apart, so that is one set whatever the
last bits). Ties are made exactly, with the same pixels in two files.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from helpers import (
    SERVED_MODEL_NAME,
    Stack,
    data_url,
    encode_image,
    encode_video,
    mixed_frames,
    noise_image,
    same_pixels_other_file,
    start_stacks,
    video_data_url,
)
from PIL import Image
from reference import load_video_frames
from router_reference import (
    compress_prob,
    frame_tiles,
    image_tiles,
    router_thresholds,
    router_weights,
    vit_features,
)

from protos.codec import EmbeddingAssembler
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc

pytestmark = pytest.mark.processes

FULL, SMALL = 256, 64
SAVING = FULL - SMALL
SEVEN_TILES = noise_image(900, 600, seed=9)  # a 3x2 grid and its thumbnail
FOUR_TILES = noise_image(1344, 448, seed=3)  # 3x1 and its thumbnail
OFF, AUTO, MAX = vision_pb2.VIR_MODE_OFF, vision_pb2.VIR_MODE_AUTO, vision_pb2.VIR_MODE_MAX


@pytest.fixture(scope="module")
def budget_stacks(
    tiny_models: dict[str, Path], tiny_flash_models: dict[str, Path], log_dir: Path
) -> Iterator[dict[str, Stack]]:
    """A vision and a language service on the Flash checkpoint, and on the plain one."""
    running = start_stacks({"flash": tiny_flash_models["hf"], "plain": tiny_models["hf"]}, log_dir)
    try:
        yield running
    finally:
        for stack in running.values():
            stack.stop()


@dataclass
class Router:
    """The independent router: p0 of an image's tiles or of a video's frames, and the
    checkpoint's thresholds."""

    oracle: Any
    weights: dict[str, torch.Tensor]
    relative: float
    absolute: float

    def image(self, image: Image.Image) -> list[float]:
        return compress_prob(
            self.weights, vit_features(self.oracle, image_tiles(self.oracle, image))
        ).tolist()

    def frames(self, frames: list[Image.Image]) -> list[float]:
        return compress_prob(
            self.weights, vit_features(self.oracle, frame_tiles(self.oracle, frames))
        ).tolist()


@pytest.fixture(scope="module")
def router(oracle, tiny_flash_models) -> Router:
    checkpoint = tiny_flash_models["original"]
    return Router(oracle, router_weights(checkpoint), *router_thresholds(checkpoint))


# ---- brute force ------------------------------------------------------------------------------


def expected_choice(
    p0: Sequence[Sequence[float]], budget: int | None, caps: Sequence[int | None] = ()
) -> list[list[bool]]:
    """Of every set of tiles that fits the request's budget and each item's cap, the smallest,
    and of those the one of highest total p0 (one set: the tests' p0 are far apart)."""
    tiles = [(item, tile) for item, values in enumerate(p0) for tile in range(len(values))]
    sizes = [len(values) for values in p0]

    def fits(chosen: set[tuple[int, int]]) -> bool:
        used = [
            FULL * n - SAVING * sum(1 for at in chosen if at[0] == i) for i, n in enumerate(sizes)
        ]
        if budget is not None and sum(used) > budget:
            return False
        return all(cap is None or used[i] <= cap for i, cap in enumerate(caps))

    for size in range(len(tiles) + 1):
        fitting = [set(c) for c in itertools.combinations(tiles, size) if fits(set(c))]
        if fitting:
            best = max(fitting, key=lambda c: sum(p0[i][t] for i, t in c))
            return [[(i, t) in best for t in range(n)] for i, n in enumerate(sizes)]
    raise AssertionError("no set of tiles fits")


def rule(p0: Sequence[Sequence[float]], relative: float, absolute: float) -> list[list[bool]]:
    """The published rule over all tiles of the request, per item."""
    flat = torch.tensor([v for values in p0 for v in values])
    decided = ((flat > torch.quantile(flat, relative)) & (flat >= absolute)).tolist()
    out, start = [], 0
    for values in p0:
        out.append(decided[start : start + len(values)])
        start += len(values)
    return out


def decisive(p0: Sequence[Sequence[float]], chosen: Sequence[Sequence[bool]]) -> None:
    """The construction: every tile chosen has a p0 above every tile left by more than 1e-3
    (the oracle and the service differ in their last bits only)."""
    picked = [
        v for values, c in zip(p0, chosen, strict=True) for v, x in zip(values, c, strict=True) if x
    ]
    left = [
        v
        for values, c in zip(p0, chosen, strict=True)
        for v, x in zip(values, c, strict=True)
        if not x
    ]
    assert not picked or not left or min(picked) - max(left) > 1e-3, (picked, left)


def far_apart(p0: Sequence[Sequence[float]]) -> None:
    """The construction: no two tiles' p0 within 1e-3 (the oracle and the service differ in
    their last bits only), so the brute force's best set is the service's."""
    flat = sorted(v for values in p0 for v in values)
    assert all(b - a > 1e-3 for a, b in itertools.pairwise(flat)), flat


# ---- the vision service's gRPC, with budgets -----------------------------------------------


def encode(
    target: str,
    images: Sequence[bytes],
    vir_mode: int,
    budget: int | None = None,
    caps: Sequence[int | None] = (),
    videos: Sequence[tuple[bytes, int]] = (),
) -> list[tuple[vision_pb2.ImageHeader, torch.Tensor]]:
    """One Encode call; each item's header and rows."""
    caps = list(caps) or [None] * len(images)
    request = vision_pb2.EncodeRequest(
        request_id="budget",
        images=[
            vision_pb2.Image(data=data, max_visual_tokens=cap)
            for data, cap in zip(images, caps, strict=True)
        ],
        options=vision_pb2.EncodeOptions(vir_mode=vir_mode, max_visual_tokens=budget),
        videos=[vision_pb2.Video(data=data, num_frames=frames) for data, frames in videos],
    )
    replies = []
    with grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        header: Any = None
        assembler: Any = None
        for message in stub.Encode(request, timeout=120):
            if message.HasField("header"):
                header = message.header
                assembler = EmbeddingAssembler(
                    (header.num_visual_tokens, header.hidden_size), header.dtype
                )
            else:
                assembler.add(message.chunk.offset, message.chunk.data)
                if assembler.complete:
                    replies.append((header, assembler.tensor()))
    return replies


def compressed(replies) -> list[list[bool]]:
    return [[t == SMALL for t in header.tokens_per_tile] for header, _ in replies]


# ---- HTTP -------------------------------------------------------------------------------------


def chat(base_url: str, content: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    body = {
        "model": SERVED_MODEL_NAME,
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "Hi"}]}],
        "max_tokens": 1,
        "temperature": 0,
        **extra,
    }
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)


def image_part(image_url: str, **extension: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": image_url, **extension}}


# ---- tests ------------------------------------------------------------------------------------


def test_a_budget_compresses_the_most_compressible_tiles_first(budget_stacks, router):
    """One image, ``vir`` off: at every budget on and just below each boundary (7 tiles:
    1,792 tokens less 192 a compression), the tiles compressed are the brute force's, and
    their rows are the 64-token rows (``max``'s), the others the 256-token rows (``off``'s)."""
    p0 = [router.image(SEVEN_TILES)]
    far_apart(p0)
    target = budget_stacks["flash"].vision_target
    data = encode_image(SEVEN_TILES)
    ((_, full),) = encode(target, [data], OFF)
    ((_, small),) = encode(target, [data], MAX)
    full_rows, small_rows = full.reshape(7, FULL, -1), small.reshape(7, SMALL, -1)
    seen = set()
    for k in range(8):
        for budget in (7 * FULL - k * SAVING, 7 * FULL - k * SAVING - 1):
            if budget < 7 * SMALL:
                continue
            replies = encode(target, [same_pixels_other_file(data, f"b{budget}")], OFF, budget)
            ((header, rows),) = replies
            expected = expected_choice(p0, budget)
            assert compressed(replies) == expected, (budget, p0)
            assert header.num_visual_tokens <= budget
            assert header.vir_mode == OFF and not header.from_cache
            seen.add(sum(expected[0]))
            offset = 0
            for tile, squeeze in enumerate(expected[0]):
                reference = small_rows[tile] if squeeze else full_rows[tile]
                assert torch.equal(rows[offset : offset + len(reference)], reference)
                offset += len(reference)
    assert seen == set(range(8))  # every count of compressions, 0 to all 7


def test_auto_puts_the_rule_on_top_of_the_budget(budget_stacks, router):
    p0 = [router.image(SEVEN_TILES)]
    target = budget_stacks["flash"].vision_target
    data = encode_image(SEVEN_TILES)
    by_rule = rule(p0, router.relative, router.absolute)
    assert 0 < sum(by_rule[0]) < 5  # the rule alone leaves room for the budget to add more
    for k in (1, 5):
        budget = 7 * FULL - k * SAVING
        replies = encode(target, [same_pixels_other_file(data, f"auto{k}")], AUTO, budget)
        by_budget = expected_choice(p0, budget)
        on_top = [[a or b for a, b in zip(by_budget[0], by_rule[0], strict=True)]]
        assert compressed(replies) == on_top, (k, p0)
    # A budget looser than what the rule leaves: the rule's choice alone.
    (alone,) = encode(target, [same_pixels_other_file(data, "auto-loose")], AUTO, 7 * FULL)
    assert compressed([alone]) == by_rule
    # max ignores the budget, even one it cannot meet.
    (maxed,) = encode(target, [same_pixels_other_file(data, "max")], MAX, 1)
    assert set(maxed[0].tokens_per_tile) == {SMALL}


def test_images_are_fitted_to_their_own_caps_then_to_the_request(budget_stacks, router):
    """Two images (7 and 4 tiles, 2,816 tokens): the second capped at 832 (one compression,
    its most compressible tile), the request at 2,048 (four compressions in all)."""
    p0 = [router.image(SEVEN_TILES), router.image(FOUR_TILES)]
    far_apart(p0)
    target = budget_stacks["flash"].vision_target
    images = [encode_image(SEVEN_TILES), encode_image(FOUR_TILES)]
    for budget, caps in [(2048, (None, 832)), (None, (1600, 832)), (2816, (None, 256))]:
        replies = encode(target, images, OFF, budget, caps)
        assert compressed(replies) == expected_choice(p0, budget, caps), (budget, caps, p0)
        tokens = [header.num_visual_tokens for header, _ in replies]
        assert all(cap is None or used <= cap for used, cap in zip(tokens, caps, strict=True))
        assert budget is None or sum(tokens) <= budget


def test_ties_go_to_the_earlier_image(budget_stacks):
    """The same pixels in two files: exactly equal p0. One compression is needed (320 =
    2 x 256 - 192); it goes to the first image, whichever file comes first."""
    target = budget_stacks["flash"].vision_target
    one_tile = encode_image(noise_image(448, 448, seed=5))
    twin = same_pixels_other_file(one_tile, "twin")
    for first, second in [(one_tile, twin), (twin, one_tile)]:
        replies = encode(target, [first, second], OFF, 320)
        assert compressed(replies) == [[True], [False]]
    # Over HTTP too, with the tokens used reported.
    stack = budget_stacks["flash"]
    urls = [f"data:image/png;base64,{base64.b64encode(data).decode()}" for data in (one_tile, twin)]
    reply = chat(stack.base_url, [image_part(u) for u in urls], vir="off", max_visual_tokens=320)
    assert reply.status_code == 200, reply.text
    vision = reply.json()["vision"]
    assert vision["compressed_tiles"] == 1 and vision["image_tokens"] == 320
    assert vision["max_visual_tokens"] == 320


def test_video_frames_and_images_share_the_budget(budget_stacks, router):
    """An image of 4 tiles and a video of 8 frames (12 tiles, 3,072 tokens) at a budget of
    2,304: four compressions over the image's tiles and the frames together."""
    video = encode_video(mixed_frames(24, seed=7))
    frames, _ = load_video_frames(video, 8)
    p0 = [router.image(FOUR_TILES), router.frames(frames)]
    expected = expected_choice(p0, 2304)
    decisive(p0, expected)
    assert sum(expected[0]) and sum(expected[1])  # both items give tiles
    stack = budget_stacks["flash"]
    replies = encode(
        stack.vision_target, [encode_image(FOUR_TILES)], OFF, 2304, videos=[(video, 8)]
    )
    assert compressed(replies) == expected
    assert replies[1][0].HasField("video")

    reply = chat(
        stack.base_url,
        [
            image_part(data_url(FOUR_TILES)),
            {"type": "video_url", "video_url": {"url": video_data_url(video)}},
        ],
        vir="off",
        num_frames=8,
        max_visual_tokens=2304,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    vision, details = body["vision"], body["usage"]["prompt_tokens_details"]
    assert vision["compressed_tiles"] == sum(expected[0])
    assert vision["compressed_frames"] == sum(expected[1])
    assert vision["image_tokens"] + vision["video_tokens"] == 2304
    assert (details["image_tokens"], details["video_tokens"]) == (
        vision["image_tokens"],
        vision["video_tokens"],
    )


def test_budgets_at_and_below_the_minimum(budget_stacks):
    """Seven tiles: 448 tokens compressed, 1,792 uncompressed."""
    url = data_url(SEVEN_TILES)
    flash, plain = budget_stacks["flash"].base_url, budget_stacks["plain"].base_url
    for budget, count in [(448, 7), (1792 - 2 * SAVING, 2), (1792, 0)]:
        reply = chat(flash, [image_part(url)], vir="off", max_visual_tokens=budget)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["vision"]["compressed_tiles"] == count
        assert body["vision"]["image_tokens"] == 1792 - count * SAVING
        assert body["usage"]["prompt_tokens_details"]["image_tokens"] == 1792 - count * SAVING
    unbudgeted = chat(flash, [image_part(url)], vir="off").json()
    budgeted = chat(flash, [image_part(url)], vir="off", max_visual_tokens=1408).json()
    assert unbudgeted["usage"]["prompt_tokens"] - budgeted["usage"]["prompt_tokens"] == 2 * SAVING
    assert "max_visual_tokens" not in unbudgeted["vision"]

    def refused(base_url: str, content, **extra) -> dict[str, Any]:
        reply = chat(base_url, content, **extra)
        assert reply.status_code == 400, reply.text
        return reply.json()["error"]

    error = refused(flash, [image_part(url)], max_visual_tokens=447)
    assert "minimum of 448 visual tokens" in error["message"]
    assert error["param"] == "max_visual_tokens"
    error = refused(flash, [image_part(url, max_visual_tokens=447)])
    assert "image 0" in error["message"] and "minimum of 448" in error["message"]
    assert error["param"] == "messages"
    for bad in (0, -1, 2**32):
        assert refused(flash, [image_part(url)], max_visual_tokens=bad)["param"] == (
            "max_visual_tokens"
        )
    # max ignores the budget.
    maxed = chat(flash, [image_part(url)], vir="max", max_visual_tokens=1)
    assert maxed.status_code == 200 and maxed.json()["vision"]["image_tokens"] == 448
    # Without a router nothing is compressed: the minimum is every tile's 256.
    error = refused(plain, [image_part(url)], max_visual_tokens=1791)
    assert "minimum of 1792 visual tokens" in error["message"]
    fits = chat(plain, [image_part(url)], max_visual_tokens=1792).json()
    assert fits["vision"]["image_tokens"] == 1792 and fits["vision"]["vir"] == "unavailable"
    # The services are still up.
    assert chat(flash, [image_part(url)]).status_code == 200


def test_budgeted_and_unbudgeted_requests_never_share_rows(budget_stacks):
    """The embedding cache: each budget (and none) has entries of its own, even where the
    rows come out the same (a budget the rule already meets)."""
    stack = budget_stacks["flash"]
    url = data_url(noise_image(900, 600, seed=1234))  # a picture no other test sends

    def send(**extra) -> dict[str, Any]:
        reply = chat(stack.base_url, [image_part(url)], **extra)
        assert reply.status_code == 200, reply.text
        return reply.json()["vision"]

    first = send()  # vir auto, no budget
    assert first["cached_images"] == 0 and 0 < first["compressed_tiles"] < 7
    same_rows = send(max_visual_tokens=first["image_tokens"])  # the rule meets it already
    assert same_rows["cached_images"] == 0
    assert same_rows["image_tokens"] == first["image_tokens"]
    tight = send(max_visual_tokens=first["image_tokens"] - SAVING)
    assert tight["cached_images"] == 0
    assert tight["compressed_tiles"] == first["compressed_tiles"] + 1
    again = send()
    assert again["cached_images"] == 1 and again["image_tokens"] == first["image_tokens"]
    tight_again = send(max_visual_tokens=first["image_tokens"] - SAVING)
    assert tight_again["cached_images"] == 1
    assert tight_again["image_tokens"] == tight["image_tokens"]
    off = send(vir="off", max_visual_tokens=first["image_tokens"] - SAVING)
    assert off["cached_images"] == 0
    # Per image, too: a cap of its own is a key of its own.
    capped = chat(
        stack.base_url, [image_part(url, max_visual_tokens=first["image_tokens"] - SAVING)]
    ).json()["vision"]
    assert capped["cached_images"] == 0 and capped["image_tokens"] == tight["image_tokens"]
    # Rows over gRPC: a hit is the same rows as its miss, and the budgeted rows differ.
    target = stack.vision_target
    data = encode_image(noise_image(700, 500, seed=4321))
    ((plain_header, plain_rows),) = encode(target, [data], AUTO)
    ((budget_header, budget_rows),) = encode(
        target, [data], AUTO, plain_header.num_visual_tokens - SAVING
    )
    ((hit_header, hit_rows),) = encode(target, [data], AUTO)
    assert not budget_header.from_cache and hit_header.from_cache
    assert torch.equal(hit_rows, plain_rows)
    assert budget_rows.shape[0] == plain_rows.shape[0] - SAVING


def test_tokenize_and_responses_take_the_budget(budget_stacks):
    stack = budget_stacks["flash"]
    url = data_url(SEVEN_TILES)
    budget = 1792 - 3 * SAVING
    messages = [{"role": "user", "content": [image_part(url), {"type": "text", "text": "Hi"}]}]
    counted = httpx.post(
        f"{stack.base_url}/tokenize",
        json={
            "model": SERVED_MODEL_NAME,
            "messages": messages,
            "vir": "off",
            "max_visual_tokens": budget,
        },
        timeout=300,
    )
    assert counted.status_code == 200, counted.text
    answered = chat(stack.base_url, [image_part(url)], vir="off", max_visual_tokens=budget).json()
    assert counted.json()["count"] == answered["usage"]["prompt_tokens"]
    response = httpx.post(
        f"{stack.base_url}/v1/responses",
        json={
            "model": SERVED_MODEL_NAME,
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": url, "max_visual_tokens": budget},
                        {"type": "input_text", "text": "Hi"},
                    ],
                }
            ],
            "max_output_tokens": 1,
            "vir": "off",
            "store": False,
        },
        timeout=300,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["input_tokens"] == answered["usage"]["prompt_tokens"]

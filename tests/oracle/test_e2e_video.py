"""Video end to end: real vision + language servers, compared with transformers' InternVL fed
the frames the model card's ``load_video`` samples, as images, in the model card's video
prompt (``Frame{i}: <image>\\n`` per frame, one tile per frame)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from helpers import (
    data_url,
    encode_image,
    encode_over_grpc,
    encode_video,
    gradient_image,
    grey_level_frames,
    mixed_frames,
    video_data_url,
)
from margins import MARGIN_PARAMS, compare_greedy, served_margins
from reference import OracleAnswer, TransformersOracle, load_video_frames, video_prompt_parts

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
QUESTION = "What happens in this video?"
VIDEO = encode_video(mixed_frames(24, width=320, height=240, seed=7))
OTHER_VIDEO = encode_video(mixed_frames(24, width=320, height=240, seed=8))
IMAGE = gradient_image(448, 448, seed=11)  # one tile, with or without dynamic tiling


def video_part(data: bytes = VIDEO) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": video_data_url(data)}}


def video_question(data: bytes = VIDEO) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [video_part(data), {"type": "text", "text": QUESTION}]}]


def chat(base_url: str, messages, **params) -> httpx.Response:
    body = {"model": "dvd-tiny-internvl", "messages": messages, **params}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=180)


def greedy(base_url: str, messages, **params) -> dict[str, Any]:
    reply = chat(
        base_url,
        messages,
        temperature=0,
        max_tokens=MAX_TOKENS,
        return_token_ids=True,
        **MARGIN_PARAMS,
        **params,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def assert_follows(reply: dict[str, Any], expected: OracleAnswer, what: str) -> None:
    """The served greedy tokens are the oracle's up to the first near tie where they part
    (``margins.compare_greedy``, with both runs' margins)."""
    choice = reply["choices"][0]
    compare_greedy(
        choice["token_ids"],
        expected.token_ids,
        [expected.margins, served_margins(choice)],
        min_compared=16,
        what=what,
    )


@pytest.fixture(scope="module")
def oracle(tiny_models) -> TransformersOracle:
    return TransformersOracle(tiny_models["hf"])


def oracle_video_answer(
    oracle: TransformersOracle, data: bytes, num_frames: int, image=None
) -> OracleAnswer:
    """The model card's reading of a video, with transformers' InternVL as the model."""
    frames, _ = load_video_frames(data, num_frames)
    parts = ([{"type": "image"}] if image is not None else []) + video_prompt_parts(num_frames)
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]
    images = ([image] if image is not None else []) + frames
    return oracle.generate(messages, images, MAX_TOKENS, crop_to_patches=False)


@pytest.fixture(scope="module")
def eight_frames(oracle) -> OracleAnswer:
    return oracle_video_answer(oracle, VIDEO, 8)


def assert_sharp(expected: OracleAnswer) -> None:
    """The comparison can fail: enough tokens, varied, with clear logit margins."""
    assert len(expected.token_ids) >= 16
    assert len(set(expected.token_ids)) > len(expected.token_ids) // 2
    assert min(expected.margins) > 1e-2


# "hf" gets its embeddings through shared memory, "original" over gRPC; "flash" is the Flash
# checkpoint (router off), "coupled" encodes in-process.
@pytest.mark.parametrize("stack", ["hf", "original", "flash", "coupled"])
def test_video_answer_equals_transformers(stacks, eight_frames, stack):
    expected = eight_frames
    assert_sharp(expected)
    reply = greedy(stacks[stack].base_url, video_question(), num_frames=8, vir="off")
    assert_follows(reply, expected, f"{stack}, 8 frames")
    assert reply["usage"]["prompt_tokens"] == expected.num_prompt_tokens
    details = reply["usage"]["prompt_tokens_details"]
    assert details["video_tokens"] == expected.num_visual_tokens == 8 * 256
    assert details["image_tokens"] == 0
    assert reply["vision"] == {
        "images": 0,
        "cached_images": 0,  # videos are never cached
        "tiles": 0,
        "compressed_tiles": 0,
        "image_tokens": 0,
        "videos": 1,
        "frames": 8,
        "compressed_frames": 0,
        "video_tokens": 8 * 256,
        "vir": "unavailable" if stack in ("hf", "original") else "off",
    }


def test_num_frames_and_the_video_change_the_answer(stacks, oracle, eight_frames):
    base_url = stacks["hf"].base_url
    four = oracle_video_answer(oracle, VIDEO, 4)
    reply = greedy(base_url, video_question(), num_frames=4)
    assert_follows(reply, four, "4 frames")
    assert reply["usage"]["prompt_tokens_details"]["video_tokens"] == 4 * 256
    assert four.token_ids != eight_frames.token_ids
    other = greedy(base_url, video_question(OTHER_VIDEO), num_frames=8)
    assert other["choices"][0]["token_ids"] != eight_frames.token_ids
    assert_follows(other, oracle_video_answer(oracle, OTHER_VIDEO, 8), "the other video")


def test_default_frames_are_the_checkpoints_eight(stacks, eight_frames):
    reply = greedy(stacks["original"].base_url, video_question())
    assert_follows(reply, eight_frames, "the default number of frames")


def test_an_image_and_a_video_in_one_message(stacks, oracle):
    expected = oracle_video_answer(oracle, VIDEO, 8, image=IMAGE)
    assert_sharp(expected)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
        video_part(),
        {"type": "text", "text": QUESTION},
    ]
    reply = greedy(stacks["hf"].base_url, [{"role": "user", "content": content}], num_frames=8)
    assert_follows(reply, expected, "an image and a video")
    details = reply["usage"]["prompt_tokens_details"]
    assert (details["image_tokens"], details["video_tokens"]) == (256, 8 * 256)
    assert reply["usage"]["prompt_tokens"] == expected.num_prompt_tokens


def test_a_video_next_to_a_cached_image(stacks):
    """The vision service's embedding cache and videos: under ``vir=auto`` the image's rows
    depend on the frames it is routed with, so a request with a video is never served the
    image's cached rows; under ``vir=off`` they do not, and the image is a hit."""
    from protos.dvd.v1 import vision_pb2

    stack = stacks["flash"]
    image = gradient_image(900, 448, seed=23)
    image_only = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    with_video = [*image_only, video_part(), {"type": "text", "text": QUESTION}]
    image_only.append({"type": "text", "text": QUESTION})
    for vir in ("auto", "off"):
        greedy(stack.base_url, [{"role": "user", "content": image_only}], vir=vir)
        again = greedy(stack.base_url, [{"role": "user", "content": image_only}], vir=vir)
        assert again["vision"]["cached_images"] == 1
    auto = greedy(stack.base_url, [{"role": "user", "content": with_video}], num_frames=8)
    assert auto["vision"]["cached_images"] == 0
    sent = encode_over_grpc(
        stack.vision_target,
        [encode_image(image)],
        vir_mode=vision_pb2.VIR_MODE_AUTO,
        videos=[(VIDEO, 8)],
    )
    assert [item.header.from_cache for item in sent] == [False, False]
    details = auto["usage"]["prompt_tokens_details"]
    assert details["image_tokens"] == sum(sent[0].header.tokens_per_tile)
    assert details["video_tokens"] == sum(sent[1].header.tokens_per_tile)
    off = greedy(stack.base_url, [{"role": "user", "content": with_video}], num_frames=8, vir="off")
    assert off["vision"]["cached_images"] == 1
    assert off["vision"]["videos"] == 1


def test_the_router_compresses_frames_and_usage_counts_them(stacks):
    """On the Flash checkpoint, ``vir=auto`` routes the video's frames together: the prompt
    holds exactly the rows the vision service decided on, and fewer than with the router off."""
    from protos.dvd.v1 import vision_pb2

    stack = stacks["flash"]
    auto = greedy(stack.base_url, video_question(), num_frames=16)
    (sent,) = encode_over_grpc(
        stack.vision_target, [], vir_mode=vision_pb2.VIR_MODE_AUTO, videos=[(VIDEO, 16)]
    )
    tokens = list(sent.header.tokens_per_tile)
    compressed = tokens.count(64)
    assert len(tokens) == 16 and 0 < compressed < 16
    assert auto["usage"]["prompt_tokens_details"]["video_tokens"] == sum(tokens)
    assert auto["vision"]["compressed_frames"] == compressed
    assert auto["vision"]["vir"] == "auto"
    off = greedy(stack.base_url, video_question(), num_frames=16, vir="off")
    assert off["usage"]["prompt_tokens_details"]["video_tokens"] == 16 * 256
    assert off["usage"]["prompt_tokens"] - auto["usage"]["prompt_tokens"] == compressed * 192
    maxed = greedy(stack.base_url, video_question(), num_frames=16, vir="max")
    assert maxed["usage"]["prompt_tokens_details"]["video_tokens"] == 16 * 64


def test_streamed_usage_counts_video_tokens(stacks):
    body = {
        "model": "dvd-tiny-internvl",
        "messages": video_question(),
        "num_frames": 2,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    url = f"{stacks['original'].base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120) as reply:
        assert reply.status_code == 200
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: {")]
    last = json.loads(events[-1])
    assert last["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0,
        "image_tokens": 0,
        "video_tokens": 2 * 256,
    }
    assert json.loads(events[0])["vision"]["frames"] == 2


def _video_url(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}]


BAD_VIDEOS = [
    (_video_url(video_data_url(b"definitely not a video" * 40)), {}, "cannot open video"),
    (
        _video_url(video_data_url(encode_video(grey_level_frames(10), fmt="mpegts"))),
        {},
        "cannot open video",
    ),
    (_video_url(video_data_url(VIDEO[: len(VIDEO) // 3])), {}, "video 0"),
    (_video_url(video_data_url(VIDEO, mime="image/png")), {}, "must be video/*"),
    (_video_url("https://videos.example.com/clip.mp4"), {}, "remote video URLs are disabled"),
    (_video_url(video_data_url(VIDEO)), {"num_frames": 65}, "num_frames=65 exceeds"),
    (_video_url(video_data_url(VIDEO)), {"num_frames": 0}, "num_frames"),
    (
        [{"role": "user", "content": [video_part()] * 5}],
        {},
        "5 videos in one request; the limit is 4",
    ),
    (
        [{"role": "assistant", "content": [video_part()]}],
        {},
        "videos are only accepted in user messages",
    ),
]


@pytest.mark.parametrize(
    ("messages", "params", "fragment"), BAD_VIDEOS, ids=[c[2][:24] for c in BAD_VIDEOS]
)
def test_bad_videos_get_a_400_and_the_server_stays_up(stacks, messages, params, fragment):
    base_url = stacks["hf"].base_url
    reply = chat(base_url, messages, max_tokens=2, **params)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"]
    if "video 0" in fragment or "cannot open" in fragment:
        assert error["code"] == "invalid_video"
    assert httpx.get(f"{base_url}/health", timeout=10).json()["vision"] == "serving"
    assert chat(base_url, video_question(), num_frames=1, max_tokens=1).status_code == 200

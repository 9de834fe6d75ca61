"""Documented request options that no other test exercised, on the session's shared stacks
(real vision and language servers on 127.0.0.1, see ``conftest.stacks``), checked against
transformers' InternVL where an independent answer exists:

- ``image_url.detail="low"`` (one 448x448 tile) and ``max_tiles`` change the tiles, the tokens
  and the answer, which is transformers' answer for the same tiling;
- ``vir_threshold`` changes the router's decisions and the answer (Flash checkpoint);
- sampling: ``top_k``, and ``temperature`` and ``top_p`` each having an effect (seeds and
  each penalty alone are checked in ``test_e2e_chat.test_sampling_parameters``);
- videos in HEVC, AV1 and Motion JPEG and in the MOV container, generated here with PyAV and
  compared with transformers fed the frames the model card's ``load_video`` samples.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from helpers import (
    SERVED_MODEL_NAME,
    data_url,
    encode_video,
    mixed_frames,
    noise_image,
    video_data_url,
)
from margins import MARGIN_PARAMS, compare_greedy, served_margins
from reference import TransformersOracle, load_video_frames, video_prompt_parts

pytestmark = pytest.mark.slow

IMAGE = noise_image(700, 300, seed=41)  # a 5x2 grid and a thumbnail at the default max_tiles
QUESTION = "What is shown in this picture?"
TEXT_CHAT = [{"role": "user", "content": "Tell me a story about the sea."}]


def image_chat(image=IMAGE, detail: str | None = None) -> list[dict[str, Any]]:
    image_url: dict[str, Any] = {"url": data_url(image)}
    if detail is not None:
        image_url["detail"] = detail
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": image_url},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]


ORACLE_IMAGE_CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
]


def chat(base_url: str, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    body = {"model": SERVED_MODEL_NAME, "messages": messages, **params}
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=180)
    assert reply.status_code == 200, reply.text
    return reply.json()


def greedy(base_url: str, messages: list[dict[str, Any]], max_tokens: int = 16, **params: Any):
    return chat(
        base_url,
        messages,
        temperature=0,
        max_tokens=max_tokens,
        return_token_ids=True,
        **MARGIN_PARAMS,
        **params,
    )


def sample_ids(base_url: str, messages=TEXT_CHAT, max_tokens: int = 24, **params: Any) -> list:
    reply = chat(base_url, messages, max_tokens=max_tokens, return_token_ids=True, **params)
    return reply["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def transformers_oracle(tiny_models) -> TransformersOracle:
    return TransformersOracle(tiny_models["hf"])


# ---- tiles: detail="low", max_tiles, vir_threshold -------------------------------------------


def test_detail_low_is_one_tile_and_transformers_answer(stacks, transformers_oracle):
    base_url = stacks["hf"].base_url
    low = greedy(base_url, image_chat(detail="low"))
    assert low["vision"]["tiles"] == 1
    assert low["usage"]["prompt_tokens_details"]["image_tokens"] == 256
    # transformers' image processor without cropping: one bicubic resize to 448x448.
    expected = transformers_oracle.generate(ORACLE_IMAGE_CHAT, [IMAGE], 16, crop_to_patches=False)
    assert expected.num_visual_tokens == 256
    choice = low["choices"][0]
    compare_greedy(
        choice["token_ids"],
        expected.token_ids,
        [expected.margins, served_margins(choice)],
        min_compared=8,
        what="detail=low against transformers without cropping",
    )
    # "auto" (the default) and "high" tile the image: 10 tiles and a thumbnail.
    for detail in ("auto", "high"):
        tiled = greedy(base_url, image_chat(detail=detail))
        assert tiled["vision"]["tiles"] == 11, detail
        assert tiled["choices"][0]["token_ids"] != choice["token_ids"], detail


def test_max_tiles_changes_tiles_and_answer_as_in_transformers(stacks, transformers_oracle):
    base_url = stacks["hf"].base_url
    default = greedy(base_url, image_chat())
    capped = greedy(base_url, image_chat(), max_tiles=2)
    assert default["vision"]["tiles"] == 11
    assert capped["vision"]["tiles"] == 3  # a 2x1 grid and the thumbnail
    assert capped["usage"]["prompt_tokens_details"]["image_tokens"] == 3 * 256
    assert capped["choices"][0]["token_ids"] != default["choices"][0]["token_ids"]
    expected = transformers_oracle.generate(ORACLE_IMAGE_CHAT, [IMAGE], 16, max_patches=2)
    assert expected.num_visual_tokens == 3 * 256
    choice = capped["choices"][0]
    compare_greedy(
        choice["token_ids"],
        expected.token_ids,
        [expected.margins, served_margins(choice)],
        min_compared=8,
        what="max_tiles=2 against transformers with max_patches=2",
    )


def test_vir_threshold_changes_the_routing_and_the_answer(stacks):
    """On the Flash checkpoint the router compresses a tile only when its p0 is at least the
    absolute threshold: 1.0 compresses nothing (the answer is vir="off"'s), 0.0 leaves the
    decision to the relative threshold alone, which compresses some tiles."""
    base_url = stacks["flash"].base_url
    image = noise_image(900, 600, seed=43)
    replies = {
        threshold: greedy(base_url, image_chat(image), vir_threshold=threshold)
        for threshold in (0.0, 1.0)
    }
    off = greedy(base_url, image_chat(image), vir="off")
    tiles = off["vision"]["tiles"]
    assert replies[1.0]["vision"]["compressed_tiles"] == 0
    compressed = replies[0.0]["vision"]["compressed_tiles"]
    assert 0 < compressed < tiles
    assert replies[0.0]["vision"]["image_tokens"] == 256 * tiles - 192 * compressed
    assert (
        replies[1.0]["usage"]["prompt_tokens"] - replies[0.0]["usage"]["prompt_tokens"]
        == 192 * compressed
    )
    assert replies[0.0]["choices"][0]["token_ids"] != replies[1.0]["choices"][0]["token_ids"]
    # Nothing compressed: the same rows as with the router off, so the same greedy answer.
    kept, plain = replies[1.0]["choices"][0], off["choices"][0]
    compare_greedy(
        kept["token_ids"],
        plain["token_ids"],
        [served_margins(kept), served_margins(plain)],
        min_compared=8,
        what="vir_threshold=1.0 against vir=off",
    )


# ---- sampling ---------------------------------------------------------------------------------


def test_top_k_keeps_sampling_among_the_k_most_likely(stacks):
    """Every token sampled with top_k=2 is one of the two most likely (the served logprobs are
    the raw ones, before temperature, so their order is top_k's); without top_k the same seed
    and temperature pick less likely tokens too. top_k=1 is greedy decoding."""
    base_url = stacks["hf"].base_url
    params: dict[str, Any] = {"temperature": 2.0, "logprobs": True, "top_logprobs": 2}

    def outside_top2(reply: dict[str, Any]) -> int:
        steps = reply["choices"][0]["logprobs"]["content"]
        return sum(
            step["token"] not in {alt["token"] for alt in step["top_logprobs"]} for step in steps
        )

    for seed in (1, 2):
        limited = chat(base_url, TEXT_CHAT, max_tokens=24, seed=seed, top_k=2, **params)
        assert outside_top2(limited) == 0, seed
    free = [chat(base_url, TEXT_CHAT, max_tokens=24, seed=s, **params) for s in (1, 2)]
    assert sum(outside_top2(reply) for reply in free) > 0, "the check would be blind"
    greedy_ids = sample_ids(base_url, temperature=0)
    assert sample_ids(base_url, temperature=2.0, top_k=1, seed=4) == greedy_ids


def test_temperature_and_top_p_have_an_effect(stacks):
    """With one seed: temperature 0 is greedy, temperature 1.5 is not; a top_p so small that
    only the most likely token is left brings 1.5 back to greedy, and top_p=0.9 does not."""
    base_url = stacks["hf"].base_url
    greedy_ids = sample_ids(base_url, temperature=0, seed=5)
    hot = sample_ids(base_url, temperature=1.5, seed=5)
    assert hot != greedy_ids
    assert sample_ids(base_url, temperature=1.5, top_p=1e-6, seed=5) == greedy_ids
    nucleus = sample_ids(base_url, temperature=1.5, top_p=0.9, seed=5)
    assert nucleus != greedy_ids


# ---- videos: codecs and containers --------------------------------------------------------------

# (encoder, container, pixel format, MIME type); the decoder of each is FFmpeg's, in the
# vision service's media workers.
VIDEO_FORMATS = {
    "hevc": ("libx265", "mp4", "yuv420p", "video/mp4"),
    "av1": ("libsvtav1", "mp4", "yuv420p", "video/mp4"),
    "mjpeg": ("mjpeg", "avi", "yuvj420p", "video/x-msvideo"),
    "mov-h264": ("libx264", "mov", "yuv420p", "video/quicktime"),
}
VIDEO_QUESTION = "What happens in this video?"
NUM_FRAMES = 4


def _encoder_available(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


@pytest.mark.parametrize("kind", list(VIDEO_FORMATS))
def test_video_codecs_and_containers(stacks, transformers_oracle, kind):
    encoder, container, pix_fmt, mime = VIDEO_FORMATS[kind]
    if not _encoder_available(encoder):
        pytest.skip(f"the installed FFmpeg has no {encoder} encoder to make a {kind} video")
    data = encode_video(
        mixed_frames(12, width=320, height=240, seed=47),
        codec=encoder,
        fmt=container,
        pix_fmt=pix_fmt,
    )
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": video_data_url(data, mime)}},
                {"type": "text", "text": VIDEO_QUESTION},
            ],
        }
    ]
    reply = greedy(stacks["hf"].base_url, messages, num_frames=NUM_FRAMES)
    assert reply["vision"]["frames"] == NUM_FRAMES
    assert reply["usage"]["prompt_tokens_details"]["video_tokens"] == NUM_FRAMES * 256
    # transformers fed the frames the model card samples, decoded here by PyAV.
    frames, _ = load_video_frames(data, NUM_FRAMES)
    oracle_messages = [
        {
            "role": "user",
            "content": [*video_prompt_parts(NUM_FRAMES), {"type": "text", "text": VIDEO_QUESTION}],
        }
    ]
    expected = transformers_oracle.generate(oracle_messages, frames, 16, crop_to_patches=False)
    choice = reply["choices"][0]
    compare_greedy(
        choice["token_ids"],
        expected.token_ids,
        [expected.margins, served_margins(choice)],
        min_compared=8,
        what=f"{kind} video against transformers",
    )

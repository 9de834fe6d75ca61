"""Chat requests shared by the end-to-end tests: conversations with images (the PIL image
kept beside each part for the oracle), and greedy, whole or streamed answers from a running
language service."""

from __future__ import annotations

import json
from typing import Any

import httpx
from helpers import data_url, gradient_image, noise_image
from margins import MARGIN_PARAMS, compare_greedy, served_margins
from reference import OracleAnswer

MAX_TOKENS = 24


def image_part(image) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(image)}, "pil": image}


def wire(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the test-only PIL handles before sending."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{k: v for k, v in part.items() if k != "pil"} for part in content]
        out.append({**message, "content": content})
    return out


IMAGE_A = noise_image(700, 300, seed=1)  # 5x2 grid + thumbnail
IMAGE_B = gradient_image(448, 448, seed=2)  # one tile
IMAGE_C = noise_image(300, 600, seed=3)
IMAGE_D = noise_image(896, 448, seed=4)
IMAGE_E = noise_image(700, 300, seed=5)  # same size as A, different content

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "one_image": [
        {
            "role": "user",
            "content": [
                image_part(IMAGE_A),
                {"type": "text", "text": "What is shown in this picture?"},
            ],
        }
    ],
    "two_images": [
        {
            "role": "user",
            "content": [
                image_part(IMAGE_B),
                image_part(IMAGE_C),
                {"type": "text", "text": "Compare the two images."},
            ],
        }
    ],
    "multi_turn": [
        {
            "role": "user",
            "content": [image_part(IMAGE_D), {"type": "text", "text": "Describe the image."}],
        },
        {"role": "assistant", "content": "It shows a dense pattern of small coloured dots."},
        {"role": "user", "content": "Which colour is the most common?"},
    ],
    "text_only": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me about the sky at night."},
    ],
}


def chat(base_url: str, messages, timeout: float = 120, **params) -> dict[str, Any]:
    body = {"model": "dvd-tiny-internvl", "messages": wire(messages), **params}
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)
    assert reply.status_code == 200, reply.text
    return reply.json()


def greedy(base_url: str, messages, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """A greedy answer with its token ids and each step's margin (``served_margins``)."""
    return chat(
        base_url,
        messages,
        temperature=0,
        max_tokens=max_tokens,
        return_token_ids=True,
        **MARGIN_PARAMS,
    )


def compare_with_oracle(
    choice: dict[str, Any], expected: OracleAnswer, what: str, min_compared: int = 16
):
    """The served greedy tokens against the oracle's, up to the first near tie where they part
    (``margins.compare_greedy``), with both runs' margins."""
    return compare_greedy(
        choice["token_ids"],
        expected.token_ids,
        [expected.margins, served_margins(choice)],
        min_compared=min_compared,
        what=what,
    )


def stream_chunks(base_url: str, messages, **params) -> list[dict[str, Any]]:
    body = {"model": "dvd-tiny-internvl", "messages": wire(messages), "stream": True, **params}
    chunks = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=180) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: ") :])
                assert "error" not in chunk, chunk
                chunks.append(chunk)
    return chunks

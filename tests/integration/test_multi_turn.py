"""Multi-turn chats through both running services, as chat UIs send them (the whole history at
every turn): later turns take the image's rows from the vision service's embedding cache and
the history's KV blocks from vLLM's prefix cache, and still answer exactly what transformers'
InternVL (``vir="off"``) or an encoder that never saw the image (the coupled stack, every
``vir`` mode) answers.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from chats import image_part, wire
from helpers import noise_image
from margins import MARGIN_PARAMS, compare_greedy, served_margins
from reference import TransformersOracle, to_oracle_messages

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
QUESTIONS = ["Describe the image.", "Which colour is the most common?", "Where is it darkest?"]
# vLLM hashes whole KV blocks; the cached part of a prompt is a whole number of them.
LARGEST_BLOCK = 256


def body(messages, **params) -> dict[str, Any]:
    return {
        "model": "dvd-tiny-internvl",
        "messages": wire(messages),
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "return_token_ids": True,
        **MARGIN_PARAMS,
        **params,
    }


def greedy(base_url: str, messages, **params) -> dict[str, Any]:
    reply = httpx.post(
        f"{base_url}/v1/chat/completions", json=body(messages, **params), timeout=120
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def vision_counters(metrics_url: str) -> dict[str, float]:
    wanted = (
        "dvd:vision_embedding_cache_hits_total",
        "dvd:vision_embedding_cache_misses_total",
        "dvd:vision_batch_tiles_sum",
    )
    values = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        match = re.match(r"^([\w:]+)\s+([0-9.eE+-]+)$", line)
        if match and match.group(1) in values:
            values[match.group(1)] = float(match.group(2))
    return values


def conversation(base_url: str, image, turns: int, **params) -> tuple[list, list[dict[str, Any]]]:
    """Chat about ``image`` for ``turns`` turns, re-sending the whole history each time;
    returns the history before each turn and the replies."""
    history: list[dict[str, Any]] = [
        {"role": "user", "content": [image_part(image), {"type": "text", "text": QUESTIONS[0]}]}
    ]
    sent, replies = [], []
    for turn in range(turns):
        if turn:
            answer = replies[-1]["choices"][0]["message"]["content"]
            history = [
                *history,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": QUESTIONS[turn]},
            ]
        sent.append(history)
        replies.append(greedy(base_url, history, **params))
    return sent, replies


@pytest.fixture(scope="module")
def oracle(tiny_models) -> TransformersOracle:
    return TransformersOracle(tiny_models["hf"])


@pytest.mark.parametrize("vir", ["off", "auto", "max"])
def test_later_turns_reuse_the_rows_and_the_kv_blocks(stacks, oracle, vir):
    stack = stacks["flash"]
    assert stack.vision is not None and stack.vision.metrics_url
    image = noise_image(900, 600, seed={"off": 501, "auto": 502, "max": 503}[vir])
    before = vision_counters(stack.vision.metrics_url)
    sent, replies = conversation(stack.base_url, image, 3, vir=vir)
    after = vision_counters(stack.vision.metrics_url)

    def delta(name: str) -> float:
        return after[name] - before[name]

    # The vision service encoded the image once, for the first turn.
    tiles = replies[0]["vision"]["tiles"]
    assert delta("dvd:vision_embedding_cache_misses_total") == 1
    assert delta("dvd:vision_embedding_cache_hits_total") == 2
    assert delta("dvd:vision_batch_tiles_sum") == tiles
    assert [reply["vision"]["cached_images"] for reply in replies] == [0, 1, 1]

    # vLLM reused the previous turn's blocks, image positions included.
    usage = [reply["usage"] for reply in replies]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usage]
    assert cached[0] == 0  # an image this stack never saw
    image_tokens = usage[0]["prompt_tokens_details"]["image_tokens"]
    for turn in (1, 2):
        assert usage[turn - 1]["prompt_tokens"] - LARGEST_BLOCK < cached[turn]
        assert cached[turn] < usage[turn]["prompt_tokens"]

    # And the answers are those of a miss, up to the first near tie where the runs part
    # (margins.py).
    if vir == "off":  # transformers' InternVL, on the same weights without the router
        for turn, (history, reply) in enumerate(zip(sent, replies, strict=True)):
            converted, images = to_oracle_messages(history)
            expected = oracle.generate(converted, images, MAX_TOKENS)
            choice = reply["choices"][0]
            compare_greedy(
                choice["token_ids"],
                expected.token_ids,
                [expected.margins, served_margins(choice)],
                min_compared=16,
                what=f"turn {turn} against transformers",
            )
    # The coupled stack encodes in its own process and has never seen this image.
    fresh = greedy(stacks["coupled"].base_url, sent[-1], vir=vir)
    assert fresh["vision"]["cached_images"] == 0
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] < image_tokens
    fresh_choice, last_choice = fresh["choices"][0], replies[-1]["choices"][0]
    compare_greedy(
        fresh_choice["token_ids"],
        last_choice["token_ids"],
        [served_margins(last_choice), served_margins(fresh_choice)],
        min_compared=16,
        what=f"the coupled stack against the cached turn (vir={vir})",
    )
    assert fresh["usage"]["prompt_tokens"] == replies[-1]["usage"]["prompt_tokens"]
    assert {**fresh["vision"], "cached_images": 1} == replies[-1]["vision"]


def test_streamed_turns_report_cached_tokens_and_images(stacks):
    stack = stacks["hf"]  # a checkpoint without a router
    image = noise_image(640, 480, seed=504)
    sent, (first,) = conversation(stack.base_url, image, 1)
    history = [
        *sent[0],
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    params = {"stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/chat/completions", json=body(history, **params), timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    assert chunks[0]["vision"]["cached_images"] == 1
    usage = chunks[-1]["usage"]
    assert chunks[-1]["vision"]["cached_images"] == 1
    assert usage["prompt_tokens_details"]["cached_tokens"] > (
        first["usage"]["prompt_tokens"] - LARGEST_BLOCK
    )
    pieces = [c for chunk in chunks for c in chunk["choices"]]
    streamed = {
        "token_ids": [t for c in pieces for t in c.get("token_ids") or []],
        "logprobs": {
            "content": [e for c in pieces for e in (c.get("logprobs") or {}).get("content") or []]
        },
    }
    # The same request again, whole: the same answer (up to the first near tie where the runs
    # part: more of its prompt comes from the prefix cache), with the same reuse.
    again = greedy(stack.base_url, history)
    compare_greedy(
        again["choices"][0]["token_ids"],
        streamed["token_ids"],
        [served_margins(streamed), served_margins(again["choices"][0])],
        min_compared=16,
        what="the whole answer against the streamed one",
    )
    assert (
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
        >= (usage["prompt_tokens_details"]["cached_tokens"])
    )
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

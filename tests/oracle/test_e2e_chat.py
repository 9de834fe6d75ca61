"""End to end: real vision + language servers (processes on 127.0.0.1), talked to over HTTP,
compared with transformers' InternVL on the same tiny checkpoint, for both layouts."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from chats import (
    CONVERSATIONS,
    IMAGE_A,
    IMAGE_B,
    IMAGE_C,
    IMAGE_E,
    MAX_TOKENS,
    chat,
    compare_with_oracle,
    greedy,
    image_part,
    wire,
)
from helpers import encode_image, encode_over_grpc, gradient_image, noise_image
from margins import MARGIN_BOUND, MARGIN_PARAMS, compare_greedy, served_margins
from reference import OracleAnswer, TransformersOracle, to_oracle_messages

pytestmark = pytest.mark.slow

LAYOUTS = ["hf", "original"]


@pytest.fixture(scope="module")
def oracle(tiny_models) -> TransformersOracle:
    return TransformersOracle(tiny_models["hf"])


@pytest.fixture(scope="module")
def oracle_answers(oracle) -> dict[str, OracleAnswer]:
    answers = {}
    for name, messages in CONVERSATIONS.items():
        converted, images = to_oracle_messages(messages)
        answers[name] = oracle.generate(converted, images, MAX_TOKENS)
    return answers


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_greedy_answer_equals_transformers(stacks, oracle_answers, layout, conversation):
    expected = oracle_answers[conversation]
    # The comparison is sharp: at least 16 tokens, varied, with clear logit margins.
    assert len(expected.token_ids) >= 16
    assert len(set(expected.token_ids)) > len(expected.token_ids) // 2
    assert min(expected.margins) > 1e-2

    reply = greedy(stacks[layout].base_url, CONVERSATIONS[conversation])
    choice = reply["choices"][0]
    comparison = compare_with_oracle(choice, expected, f"{layout}/{conversation}")
    if comparison.complete:  # past a near tie the texts continue different prefixes
        assert choice["message"]["content"] == expected.text, comparison
        assert reply["usage"]["completion_tokens"] == len(expected.token_ids)
    assert reply["usage"]["prompt_tokens"] == expected.num_prompt_tokens
    assert reply["usage"]["prompt_tokens_details"]["image_tokens"] == expected.num_visual_tokens


def test_a_different_image_gives_a_different_answer(stacks, oracle):
    question = {"type": "text", "text": "What is shown in this picture?"}
    first = [{"role": "user", "content": [image_part(IMAGE_A), question]}]
    second = [{"role": "user", "content": [image_part(IMAGE_E), question]}]
    choices = [greedy(stacks["hf"].base_url, m)["choices"][0] for m in (first, second)]
    assert choices[0]["token_ids"] != choices[1]["token_ids"]
    converted, images = to_oracle_messages(second)
    compare_with_oracle(
        choices[1], oracle.generate(converted, images, MAX_TOKENS), "the second image's answer"
    )


def test_image_tokens_equal_what_the_vision_service_sent(stacks):
    messages = CONVERSATIONS["two_images"]
    reply = greedy(stacks["original"].base_url, messages, max_tokens=2)
    sent = encode_over_grpc(
        stacks["original"].vision_target, [encode_image(IMAGE_B), encode_image(IMAGE_C)]
    )
    assert reply["usage"]["prompt_tokens_details"]["image_tokens"] == sum(
        r.header.num_visual_tokens for r in sent
    )


def test_official_openai_client(stacks):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stacks['hf'].base_url}/v1", api_key="unused")
    messages = wire(CONVERSATIONS["one_image"])
    response = client.chat.completions.create(
        model="dvd-tiny-internvl", messages=messages, temperature=0, max_tokens=MAX_TOKENS
    )
    text = response.choices[0].message.content
    assert text and response.choices[0].finish_reason in ("length", "stop")
    assert response.usage.prompt_tokens_details.image_tokens == 11 * 256  # type: ignore[union-attr]

    stream = client.chat.completions.create(
        model="dvd-tiny-internvl",
        messages=messages,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text
    assert finish == response.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == response.usage.completion_tokens

    models = client.models.list()
    assert [m.id for m in models.data] == ["dvd-tiny-internvl"]


def test_stream_ends_with_done(stacks):
    body = {
        "model": "dvd-tiny-internvl",
        "messages": wire(CONVERSATIONS["text_only"]),
        "stream": True,
        "max_tokens": 5,
        "temperature": 0,
    }
    with httpx.stream(
        "POST", f"{stacks['hf'].base_url}/v1/chat/completions", json=body, timeout=60
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: ") :])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_sixteen_concurrent_requests_get_their_own_answers(stacks):
    base_url = stacks["hf"].base_url
    images = [
        noise_image(448 + 16 * i, 448, seed=200 + i)
        if i % 2
        else gradient_image(448, 448, seed=200 + i)
        for i in range(16)
    ]
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    image_part(image),
                    {"type": "text", "text": f"Question {i}: what is this?"},
                ],
            }
        ]
        for i, image in enumerate(images)
    ]
    alone = [greedy(base_url, c, max_tokens=16)["choices"][0] for c in conversations]
    assert len({tuple(a["token_ids"]) for a in alone}) == 16  # all different
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(
            pool.map(lambda c: greedy(base_url, c, max_tokens=16)["choices"][0], conversations)
        )
    # Batched with fifteen others, a request may only part from its lone run at a near tie.
    comparisons = [
        compare_greedy(
            mixed["token_ids"],
            lone["token_ids"],
            [served_margins(lone), served_margins(mixed)],
            min_compared=1,
            what=f"conversation {i}, together vs alone",
        )
        for i, (mixed, lone) in enumerate(zip(together, alone, strict=True))
    ]
    compared = sum(c.compared for c in comparisons)
    steps = sum(c.steps for c in comparisons)
    assert compared >= steps * 3 // 4, [str(c) for c in comparisons]


def test_sampling_parameters(stacks):
    base_url = stacks["hf"].base_url
    messages = CONVERSATIONS["text_only"]
    seeded = [
        chat(base_url, messages, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)["choices"][0][
            "message"
        ]["content"]
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    # n=3: three samples, not one sample three times; vLLM seeds choice i with seed + i, so
    # each is the answer a lone request with that seed gets, and the same request gets the
    # same three again.
    several = chat(
        base_url, messages, temperature=1.0, n=3, max_tokens=8, seed=3, return_token_ids=True
    )
    choices = several["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    samples = [c["token_ids"] for c in choices]
    assert len({tuple(s) for s in samples}) == 3, samples
    assert all(len(c["token_ids"]) == 8 and c["finish_reason"] == "length" for c in choices)
    assert several["usage"]["completion_tokens"] == 24
    lone = [
        chat(base_url, messages, temperature=1.0, max_tokens=8, seed=3 + i, return_token_ids=True)
        for i in range(3)
    ]
    assert [reply["choices"][0]["token_ids"] for reply in lone] == samples
    assert [reply["choices"][0]["message"]["content"] for reply in lone] == [
        c["message"]["content"] for c in choices
    ]
    again = chat(
        base_url, messages, temperature=1.0, n=3, max_tokens=8, seed=3, return_token_ids=True
    )
    assert [c["token_ids"] for c in again["choices"]] == samples
    limited = chat(
        base_url, messages, temperature=0, max_completion_tokens=3, return_token_ids=True
    )
    assert (
        len(limited["choices"][0]["token_ids"]) == 3
        and limited["choices"][0]["finish_reason"] == "length"
    )
    full = greedy(base_url, messages)["choices"][0]["message"]["content"]
    stop_word = full.split()[2] if len(full.split()) > 3 else full[5:8]
    stopped = chat(base_url, messages, temperature=0, max_tokens=MAX_TOKENS, stop=[stop_word])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stop_word not in stopped["choices"][0]["message"]["content"]
    assert full.startswith(stopped["choices"][0]["message"]["content"])

    # Presence and frequency penalties, each alone and both together. They lower only the
    # logits of tokens already generated, so a penalised greedy run follows the plain one
    # exactly until the plain one repeats a token, and the first token where they part is such
    # a repeat (128 tokens make repeats certain); every step follows OpenAI's definition.
    # "Exactly", not up to a near tie (margins.py): each run is alone, and the requests above
    # already left in the prefix cache whatever of this prompt it keeps, so every run computes
    # the same shapes and its raw logits are the same bits for as long as its tokens are.
    plain_ids = greedy(base_url, messages, max_tokens=128)["choices"][0]["token_ids"]
    first_repeat = next(i for i, t in enumerate(plain_ids) if t in plain_ids[:i])
    penalised: dict[tuple[float, float], list[int]] = {}
    for presence, frequency in ((2.0, 0.0), (0.0, 2.0), (2.0, 2.0)):
        choice = chat(
            base_url,
            messages,
            temperature=0,
            max_tokens=128,
            presence_penalty=presence,
            frequency_penalty=frequency,
            return_token_ids=True,
            logprobs=True,
            top_logprobs=20,
        )["choices"][0]
        assert_penalised_steps(choice, presence, frequency)
        ids = penalised[(presence, frequency)] = choice["token_ids"]
        parted = next(i for i, (a, b) in enumerate(zip(plain_ids, ids, strict=False)) if a != b)
        assert parted >= first_repeat, (presence, frequency)
        assert plain_ids[parted] in plain_ids[:parted]  # the penalised run refused a repeat
    # For a token generated once, both penalties take off the same; they differ from the
    # second time on. So the presence-only and frequency-only runs part, where the token one
    # of them takes had already been generated twice.
    by_presence, by_frequency = penalised[(2.0, 0.0)], penalised[(0.0, 2.0)]
    apart = next(
        (i for i, (a, b) in enumerate(zip(by_presence, by_frequency, strict=False)) if a != b),
        None,
    )
    assert apart is not None, "the two penalties never parted: the check is blind"
    earlier = Counter(by_presence[:apart])
    assert max(earlier[by_presence[apart]], earlier[by_frequency[apart]]) >= 2


def assert_penalised_steps(choice: dict[str, Any], presence: float, frequency: float) -> None:
    """Each step of a penalised greedy answer against OpenAI's definition of the penalties:
    a token's logit minus ``frequency`` x (times already generated) minus ``presence`` if
    generated at all. The served log-probabilities are the raw ones, one normaliser per step,
    so their differences are logit differences: the chosen token must have the best penalised
    score among itself and the 20 best raw candidates, unless short of it by less than
    MARGIN_BOUND (a near tie). Tokens are told apart by their bytes, which the entries carry."""
    generated: Counter[tuple[int, ...]] = Counter()
    changed = 0
    entries = choice["logprobs"]["content"]
    assert len(entries) == len(choice["token_ids"])
    for step, entry in enumerate(entries):
        raw = {tuple(alt["bytes"]): alt["logprob"] for alt in entry["top_logprobs"]}
        chosen = tuple(entry["bytes"])
        raw[chosen] = entry["logprob"]
        score = {
            token: logprob - frequency * generated[token] - presence * (generated[token] > 0)
            for token, logprob in raw.items()
        }
        best_other = max(s for token, s in score.items() if token != chosen)
        assert score[chosen] > best_other - MARGIN_BOUND, (
            f"step {step}: {entry['token']!r} scores {score[chosen]:.3f} after the penalties, "
            f"another candidate {best_other:.3f} (presence {presence}, frequency {frequency})"
        )
        changed += max(raw.values()) > raw[chosen]
        generated[chosen] += 1
    assert changed, "the penalties never changed a greedy choice: the check is blind"


def _metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"^([\w:]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if not match or match.group(1) != name:
            continue
        label_text = match.group(2) or ""
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(match.group(3))
    return total


def test_client_disconnect_aborts_the_request(stacks):
    """A stream that would run for thousands of tokens stops in the engine when the client goes."""
    base_url = stacks["hf"].base_url
    body = {
        "model": "dvd-tiny-internvl",
        "messages": wire(CONVERSATIONS["one_image"]),
        "stream": True,
        "max_tokens": 5000,
        "min_tokens": 5000,  # no early EOS: without the abort this runs for a long time
        "temperature": 0,
    }
    tokens_before = _metric(base_url, "vllm:generation_tokens_total")
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()  # held, so that the connection stays open
        received = [next(lines) for _ in range(6)]  # events are separated by blank lines
        assert sum(line.startswith("data: ") for line in received) == 3
        # The engine reports the request as running (its gauges update every step).
        deadline = time.monotonic() + 10
        while (running := _metric(base_url, "vllm:num_requests_running")) != 1:
            assert time.monotonic() < deadline, (
                f"the request never showed up as running ({running})"
            )
            time.sleep(0.1)
        reply.close()
    # The connection is closed mid-stream.
    deadline = time.monotonic() + 10
    while _metric(base_url, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, (
            "request still running in the engine after the client left"
        )
        time.sleep(0.1)
    # Neither running nor waiting: the engine holds nothing that could produce more tokens.
    assert _metric(base_url, "vllm:num_requests_waiting") == 0
    generated = _metric(base_url, "vllm:generation_tokens_total")
    assert generated - tokens_before < 5000


ERROR_CASES = [
    ({"model": "other-model"}, 404, "does not exist"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "tool_call_id"),
    ({"temperature": 3}, 400, "temperature"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, 400, "audio is not supported"),
    ({"max_tokens": 100000}, 400, "maximum context length is 8192"),
    ({"n": 100}, 400, "n=100"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ]
        },
        400,
        "cannot decode image",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
                    ],
                }
            ]
        },
        400,
        "remote image URLs are disabled",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
                }
            ]
        },
        400,
        "scheme",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ]
        },
        400,
        "only accepted in user messages",
    ),
    ({"messages": [{"role": "user", "content": "look: <IMG_CONTEXT>"}]}, 400, "must not contain"),
]


@pytest.mark.parametrize(
    ("override", "status", "fragment"), ERROR_CASES, ids=[c[2][:24] for c in ERROR_CASES]
)
def test_bad_requests_get_openai_errors(stacks, override, status, fragment):
    base_url = stacks["hf"].base_url
    body = {
        "model": "dvd-tiny-internvl",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **override,
    }
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"]
    assert error["type"]
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200


def test_vision_service_down_gives_503_and_text_still_works(stacks, tiny_models, log_dir):
    """Stops the original-layout stack's vision service, then brings it back on the same port."""
    from helpers import restart_vision_server

    stack = stacks["original"]
    assert stack.vision is not None
    stack.vision.stop()
    messages = CONVERSATIONS["one_image"]
    reply = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "dvd-tiny-internvl", "messages": wire(messages), "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 503, reply.text
    assert "Retry-After" in reply.headers
    error = reply.json()["error"]
    assert error["code"] == "vision_unavailable"
    # Refused because nothing listens there, not after the vision deadline ("did not answer
    # in time").
    assert "vision service is unavailable" in error["message"], error
    assert httpx.get(f"{stack.base_url}/health", timeout=10).json()["vision"] == "unavailable"
    assert greedy(stack.base_url, CONVERSATIONS["text_only"])["choices"][0]["token_ids"]

    # Its address, which the language service names, once the stopped one has released it.
    stack.vision = restart_vision_server(
        stack.vision,
        "original-vision-restarted",
        tiny_models["original"],
        stack.vision_target,
        log_dir,
    )
    deadline = time.monotonic() + 30
    while True:  # the language service reconnects by itself (bounded backoff)
        reply = httpx.post(
            f"{stack.base_url}/v1/chat/completions",
            json={"model": "dvd-tiny-internvl", "messages": wire(messages), "max_tokens": 4},
            timeout=60,
        )
        if reply.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert reply.status_code == 200, reply.text


# ---- InternVL3.5-Flash: the Visual Resolution Router through the whole stack -------------


def _cache_hits(stack) -> float:
    """The vision service's embedding-cache hits so far: whether an image was cached depends
    on what earlier tests sent this session's stack, so the tests compare against the delta."""
    assert stack.vision is not None and stack.vision.metrics_url
    for line in httpx.get(stack.vision.metrics_url, timeout=10).text.splitlines():
        if line.startswith("dvd:vision_embedding_cache_hits_total "):
            return float(line.split()[1])
    return 0.0


def test_flash_checkpoint_with_vir_off_equals_transformers(stacks, oracle_answers):
    expected = oracle_answers["one_image"]
    hits_before = _cache_hits(stacks["flash"])
    reply = chat(
        stacks["flash"].base_url,
        CONVERSATIONS["one_image"],
        temperature=0,
        max_tokens=MAX_TOKENS,
        return_token_ids=True,
        vir="off",
        **MARGIN_PARAMS,
    )
    compare_with_oracle(reply["choices"][0], expected, "flash, vir off")
    assert reply["usage"]["prompt_tokens_details"]["image_tokens"] == expected.num_visual_tokens
    assert reply["vision"] == {
        "images": 1,
        "cached_images": _cache_hits(stacks["flash"]) - hits_before,
        "tiles": 11,
        "compressed_tiles": 0,
        "image_tokens": 11 * 256,
        "vir": "off",
    }


def test_flash_router_reports_the_real_image_tokens(stacks):
    from protos.dvd.v1 import vision_pb2

    stack = stacks["flash"]
    image = noise_image(900, 600, seed=9)
    messages = [
        {"role": "user", "content": [image_part(image), {"type": "text", "text": "What is this?"}]}
    ]
    hits_before = _cache_hits(stack)
    reply = chat(stack.base_url, messages, temperature=0, max_tokens=4)  # vir defaults to auto
    cached = _cache_hits(stack) - hits_before
    (sent,) = encode_over_grpc(
        stack.vision_target, [encode_image(image)], vir_mode=vision_pb2.VIR_MODE_AUTO
    )
    tokens = list(sent.header.tokens_per_tile)
    compressed = tokens.count(64)
    assert 0 < compressed < len(tokens)
    assert (
        reply["usage"]["prompt_tokens_details"]["image_tokens"] == sum(tokens) < 256 * len(tokens)
    )
    assert reply["vision"] == {
        "images": 1,
        "cached_images": cached,
        "tiles": len(tokens),
        "compressed_tiles": compressed,
        "image_tokens": sum(tokens),
        "vir": "auto",
    }
    maxed = chat(stack.base_url, messages, temperature=0, max_tokens=4, vir="max")
    assert maxed["usage"]["prompt_tokens_details"]["image_tokens"] == 64 * len(tokens)
    # Fewer prompt tokens with the router, by exactly the rows it removed.
    off = chat(stack.base_url, messages, temperature=0, max_tokens=4, vir="off")
    assert off["usage"]["prompt_tokens"] - reply["usage"]["prompt_tokens"] == compressed * 192


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"vir": "medium"}, "vir"),
        ({"vir_threshold": 1.5}, "vir_threshold"),
        ({"max_tiles": 0}, "max_tiles"),
    ],
)
def test_invalid_vir_options_are_400(stacks, override, fragment):
    body = {
        "model": "dvd-tiny-internvl",
        "messages": wire(CONVERSATIONS["one_image"]),
        "max_tokens": 2,
        **override,
    }
    reply = httpx.post(f"{stacks['flash'].base_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400
    assert fragment in reply.json()["error"]["message"]


def test_vir_on_a_non_flash_checkpoint(stacks):
    messages = CONVERSATIONS["one_image"]
    auto = chat(stacks["hf"].base_url, messages, temperature=0, max_tokens=2, vir="auto")
    assert auto["vision"]["vir"] == "unavailable"
    assert auto["vision"]["compressed_tiles"] == 0
    body = {"model": "dvd-tiny-internvl", "messages": wire(messages), "max_tokens": 2, "vir": "max"}
    reply = httpx.post(f"{stacks['hf'].base_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400
    assert "InternVL3.5-Flash" in reply.json()["error"]["message"]

"""Bounds before work, without a server: every request-controlled size is refused with a 400
naming its field, before any image is fetched; the lists are capped while the body is parsed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import ValidationError

from llm_server.api.limits import check_request_limits, json_size, request_text_chars
from llm_server.api.protocol import MESSAGES_CAP, ChatCompletionRequest
from llm_server.api.serving import ChatService
from llm_server.engine.backbone import Backbone
from llm_server.errors import BadRequest
from llm_server.settings import LLMSettings

MODEL = "dvd-tiny-internvl"
USER = {"role": "user", "content": "hi"}
IMAGE = {"type": "image_url", "image_url": {"url": "http://images.example/cat.png"}}


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": [USER], **fields})


def tool(name: str = "f", parameters: dict[str, Any] | None = None, **extra: Any) -> dict:
    function = {"name": name, "parameters": parameters or {"type": "object"}, **extra}
    return {"type": "function", "function": function}


def settings(**fields: Any) -> LLMSettings:
    return LLMSettings(**fields)  # type: ignore[call-arg]


def big_schema(chars: int) -> dict[str, Any]:
    return {"type": "object", "description": "d" * chars}


def call(index: int) -> dict[str, Any]:
    return {"id": f"c{index}", "function": {"name": "f", "arguments": "{}"}}


OVER_THE_LIMIT = [
    # (name, request fields, settings fields, param, message fragment)
    ("messages", {"messages": [USER] * 2049}, {}, "messages", "2049 messages"),
    ("messages, tighter", {"messages": [USER] * 5}, {"max_messages": 4}, "messages", "limit is 4"),
    (
        "content parts",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 257}]},
        {},
        "messages",
        "257 content parts",
    ),
    (
        "tool calls in a message",
        {"messages": [USER, {"role": "assistant", "tool_calls": [call(i) for i in range(9)]}]},
        {"max_content_parts": 8},
        "messages",
        "9 tool calls",
    ),
    (
        "text",
        {"messages": [{"role": "user", "content": "x" * 1_000_001}]},
        {},
        "messages",
        "1000001 characters",
    ),
    (
        "text in parts, names, calls and tool descriptions",
        {
            "messages": [
                {"role": "system", "content": "s" * 30, "name": "n" * 10},
                {"role": "user", "content": [{"type": "text", "text": "t" * 30}]},
                {"role": "assistant", "tool_calls": [call(0)]},
            ],
            "tools": [tool(description="d" * 30)],
        },
        {"max_text_chars": 100},
        "messages",
        "characters",
    ),
    ("tools", {"tools": [tool(f"f{i}") for i in range(129)]}, {}, "tools", "129 tools"),
    (
        "a tool's schema",
        {"tools": [tool(parameters=big_schema(262_144))]},
        {},
        "tools",
        "262144 characters of JSON",
    ),
    (
        "the tools' schemas together",
        {"tools": [tool(f"f{i}", big_schema(400)) for i in range(3)]},
        {"max_schema_chars": 1000},
        "tools",
        "1000 characters of JSON",
    ),
    (
        "response_format's schema after the tools'",
        {
            "tools": [tool(parameters=big_schema(600))],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": big_schema(600)},
            },
        },
        {"max_schema_chars": 1000},
        "response_format",
        "characters of JSON",
    ),
    ("stop sequences", {"stop": ["s"] * 17}, {}, "stop", "17 stop sequences"),
    ("a stop sequence's length", {"stop": "s" * 257}, {}, "stop", "257 characters"),
    (
        "logit_bias",
        {"logit_bias": {str(i): 1 for i in range(1025)}},
        {},
        "logit_bias",
        "1025 logit_bias entries",
    ),
    (
        "top_logprobs",
        {"logprobs": True, "top_logprobs": 6},
        {"max_top_logprobs": 5},
        "top_logprobs",
        "limit of 5",
    ),
    ("n", {"n": 9}, {}, "n", "n=9"),
    ("max_tiles", {"max_tiles": 41}, {}, "max_tiles", "limit of 40"),
    ("num_frames, without a video", {"num_frames": 65}, {}, "num_frames", "limit of 64"),
]


@pytest.mark.parametrize(
    ("name", "fields", "limits", "param", "fragment"),
    OVER_THE_LIMIT,
    ids=[case[0] for case in OVER_THE_LIMIT],
)
def test_each_bound_is_refused_naming_its_field(name, fields, limits, param, fragment):
    configured = settings(**limits)
    with pytest.raises(BadRequest) as refused:
        check_request_limits(request(**fields), configured, configured.max_tiles_limit)
    assert refused.value.status_code == 400
    assert refused.value.param == param
    assert fragment in refused.value.message, refused.value.message


def test_requests_at_the_limits_pass():
    configured = settings()
    at_limits = request(
        messages=[USER] * 2047
        + [{"role": "user", "content": [{"type": "text", "text": "a"}] * 256}],
        tools=[tool(f"f{i}") for i in range(128)],
        stop=["s" * 256] * 16,
        logit_bias={str(i): 1 for i in range(1024)},
        logprobs=True,
        top_logprobs=20,
        n=8,
        max_tiles=40,
        num_frames=64,
    )
    check_request_limits(at_limits, configured, 40)


def test_the_vision_services_tile_limit_applies_when_tighter():
    with pytest.raises(BadRequest, match="limit of 12") as refused:
        check_request_limits(request(max_tiles=13), settings(), max_tiles_limit=12)
    assert refused.value.param == "max_tiles"
    check_request_limits(request(max_tiles=12), settings(), max_tiles_limit=12)


def test_lists_are_capped_while_the_body_is_parsed():
    """Past a cap, validation stops at the first item over it (``too_long``), whatever the
    service's own, tighter, limit."""
    body = {"model": MODEL, "messages": [USER] * (MESSAGES_CAP + 1)}
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate(body)
    assert [error["type"] for error in refused.value.errors()] == ["too_long"]
    for fields in (
        {"stop": ["s"] * 1025},
        {"logit_bias": {str(i): 1 for i in range(262_145)}},
        {"tools": [tool(f"f{i}") for i in range(4097)]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 4097}]},
    ):
        with pytest.raises(ValidationError, match="too_long"):
            request(**fields)


def test_json_size_is_the_compact_json_length_and_stops_early():
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2.5, None, True]}}, "x": []}
    assert json_size(schema, 10**6) == len(json.dumps(schema, separators=(",", ":")))
    # Counted no further than the limit: what lies past it is never looked at (a value that
    # JSON cannot hold would raise).
    assert json_size({"b": object(), "a": "x" * 2000}, 1000) > 1000
    assert json_size([object()] * 10**6, 1000) > 1000
    deep: dict[str, Any] = {}
    for _ in range(10_000):  # deeper than Python's recursion limit: no RecursionError
        deep = {"items": deep}
    assert json_size(deep, 10**6) == len('{"items":') * 10_000 + 2 + 10_000


def test_text_chars_count_what_the_prompt_is_rendered_from():
    counted = request(
        messages=[
            {"role": "system", "content": "abc", "name": "nm"},
            {"role": "user", "content": [{"type": "text", "text": "de"}, IMAGE]},
            {"role": "assistant", "tool_calls": [call(0)]},
            {"role": "tool", "content": "ok", "tool_call_id": "c0"},
        ],
        tools=[tool(description="fgh")],
    )
    assert request_text_chars(counted) == 3 + 2 + 2 + (2 + 1 + 2) + 2 + 2 + 3


# ---- the checks come before any image is fetched ---------------------------------------------


class Fetched(Exception):
    """An image was asked for: the request got past its checks."""


class RecordingImages:
    async def load(self, url: str, kind: str = "image") -> bytes:
        raise Fetched(url)


class StandInEngine:
    model_name = MODEL
    vocab_size = 2048
    errored = False
    max_model_len = 4096
    backbone = Backbone(model_type="qwen3", architecture="Qwen3ForCausalLM")


@pytest.fixture(scope="module")
def prompts(tiny_models):
    from transformers import AutoTokenizer

    from checkpoints.spec import load_checkpoint_spec
    from llm_server.prompt import PromptBuilder

    path = tiny_models["hf"]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return PromptBuilder(tokenizer, load_checkpoint_spec(path).image_tokens)


def chat_service(prompts: Any, encoder_max_tiles: Any = None, **limits: Any) -> ChatService:
    return ChatService(
        StandInEngine(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # never reached
        prompts,
        RecordingImages(),  # type: ignore[arg-type]
        settings(**limits),
        encoder_max_tiles=encoder_max_tiles,
    )


def prepare(chat: ChatService, **fields: Any) -> None:
    messages = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "what is it?"}]}]
    asyncio.run(chat.prepare(request(**{"messages": messages, **fields}), "req-1"))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tiles": 41}, "max_tiles"),
        ({"num_frames": 65}, "num_frames"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"tools": [tool(parameters=big_schema(300_000))]}, "tools"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ],
)
def test_a_request_over_a_bound_fetches_no_image(prompts, fields, param):
    chat = chat_service(prompts)
    with pytest.raises(BadRequest) as refused:
        prepare(chat, **fields)
    assert refused.value.param == param
    with pytest.raises(Fetched):  # within the bounds, the same request fetches its image
        prepare(chat)


def test_max_tiles_follows_the_encoders_limit_once_known(prompts):
    reported: list[int | None] = [None]
    chat = chat_service(prompts, encoder_max_tiles=lambda: reported[0], max_tiles_limit=30)
    with pytest.raises(BadRequest, match="limit of 30"):  # before: the local setting
        prepare(chat, max_tiles=31)
    with pytest.raises(Fetched):
        prepare(chat, max_tiles=20)
    reported[0] = 12  # the vision service said
    with pytest.raises(BadRequest, match="limit of 12") as refused:
        prepare(chat, max_tiles=20)
    assert refused.value.param == "max_tiles"
    reported[0] = 64  # a looser encoder does not lift the local limit
    with pytest.raises(BadRequest, match="limit of 30"):
        prepare(chat, max_tiles=31)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"n": 3, "temperature": 0.0}, "greedy"),  # vLLM's VLLMValidationError
        ({"top_p": 0.0}, "top_p"),  # vLLM's ValueError
    ],
)
def test_what_vllm_refuses_in_sampling_is_a_400(fields, fragment):
    """Combinations only vLLM's own checks refuse are client errors, whatever exception type
    vLLM raises for them (n > 1 when greedy was a 500)."""
    from llm_server.api.serving import checked_sampling_params

    with pytest.raises(BadRequest, match=fragment):
        checked_sampling_params(**fields)


def test_a_prompt_is_validated_as_one_form_only():
    """A completion prompt is validated only as the form its first element names: 100,000
    strings, each also not a token id, made 200,000 errors (0.9 s to report) when every
    form was tried; now the one form's cap stops it at its first item past the cap."""
    from llm_server.api.completion_protocol import PROMPTS_CAP, CompletionRequest

    for prompt in (["a"] * 100_000, ["a", 1] * (PROMPTS_CAP // 2)):
        with pytest.raises(ValidationError) as caught:
            CompletionRequest.model_validate({"model": MODEL, "prompt": prompt})
        assert caught.value.error_count() <= PROMPTS_CAP // 2
    forms = {
        "x": ["x"],
        ("x", "y"): ["x", "y"],
        (1, 2): [[1, 2]],
        ((1, 2), (3,)): [[1, 2], [3]],
    }
    for prompt, expected in forms.items():
        as_json = json.loads(json.dumps(prompt))
        request = CompletionRequest.model_validate({"model": MODEL, "prompt": as_json})
        assert request.prompts == expected

"""OpenAI features without a server: request validation, token bytes, logprob shaping, tool
rendering (against transformers' own chat-template rendering) and tool-call streaming."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from checkpoints.spec import ImageTokens
from llm_server.api.choices import ChoiceOutput
from llm_server.api.features import OpenAIFeatures
from llm_server.api.logprobs import TokenBytes, chat_logprobs
from llm_server.api.protocol import AssistantMessage, ChatCompletionRequest, ChatMessage
from llm_server.errors import BadRequest
from llm_server.prompt import PromptBuilder

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["hf"]))


@pytest.fixture(scope="module")
def features(tokenizer) -> OpenAIFeatures:
    return OpenAIFeatures(tokenizer, vocab_size=len(tokenizer), tool_parser="hermes")


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


# ---- wire models -----------------------------------------------------------------------------


def test_message_rules_for_tools():
    with pytest.raises(ValidationError, match="tool_call_id"):
        ChatMessage.model_validate({"role": "tool", "content": "sunny"})
    with pytest.raises(ValidationError, match="only accepted in assistant"):
        ChatMessage.model_validate(
            {
                "role": "user",
                "content": "x",
                "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}],
            }
        )
    with pytest.raises(ValidationError, match="content or tool_calls"):
        ChatMessage.model_validate({"role": "assistant", "content": None})
    ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}],
        }
    )


def test_a_message_with_only_tool_calls_has_null_content_on_the_wire():
    call = {"id": "a", "function": {"name": "f", "arguments": "{}"}}
    message = AssistantMessage.model_validate({"content": None, "tool_calls": [call]})
    wire = message.model_dump(exclude_none=True)
    assert wire["content"] is None and wire["tool_calls"][0]["function"]["name"] == "f"


def test_response_format_shapes():
    schema = {"type": "object"}
    parsed = request(
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    )
    assert parsed.response_format is not None
    assert parsed.response_format.json_schema.json_schema == schema  # type: ignore[union-attr]
    with pytest.raises(ValidationError):
        request(response_format={"type": "yaml"})
    with pytest.raises(ValidationError):
        request(logit_bias={"5": 100.5})
    with pytest.raises(ValidationError):
        request(top_logprobs=21)


# ---- features -> sampling parameters ---------------------------------------------------------


def test_logprobs_and_logit_bias(features):
    resolved = features.resolve(request(logprobs=True, top_logprobs=4, logit_bias={"7": -100}))
    assert resolved.sampling["logprobs"] == 4
    assert resolved.sampling["logit_bias"] == {7: -100.0}
    assert features.resolve(request(logprobs=True)).sampling["logprobs"] == 0
    assert "logprobs" not in features.resolve(request()).sampling
    with pytest.raises(BadRequest, match="needs logprobs"):
        features.resolve(request(top_logprobs=2))
    for key in ("2048", "-1", "seven", "1.5"):
        with pytest.raises(BadRequest) as caught:
            features.resolve(request(logit_bias={key: 1}))
        assert caught.value.param == "logit_bias" and key in caught.value.message


def test_response_format_becomes_a_structured_output(features):
    schema = {"type": "object", "properties": {"a": {"enum": ["x"]}}}
    body = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    constraint = features.resolve(request(response_format=body)).sampling["structured_outputs"]
    assert constraint.json == schema
    constraint = features.resolve(request(response_format={"type": "json_object"})).sampling[
        "structured_outputs"
    ]
    assert constraint.json_object is True
    assert (
        "structured_outputs"
        not in features.resolve(request(response_format={"type": "text"})).sampling
    )
    bad = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "thing"}}}
    with pytest.raises(BadRequest, match="not a valid JSON Schema"):
        features.resolve(request(response_format=bad))


def test_tool_choices(features):
    auto = features.resolve(request(tools=[WEATHER]))
    assert auto.template_tools == [WEATHER]
    assert "structured_outputs" not in auto.sampling  # free text, calls parsed if any
    assert auto.output.parses_tool_calls

    none = features.resolve(request(tools=[WEATHER], tool_choice="none"))
    assert none.template_tools is None and not none.output.parses_tool_calls

    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        forced = features.resolve(request(tools=[WEATHER], tool_choice=choice))
        tag = json.loads(forced.sampling["structured_outputs"].structural_tag)
        text = json.dumps(tag)
        # The grammar spells the call envelope with the function's name and its schema.
        assert "<tool_call>" in text and "get_weather" in text and '"Paris"' in text
        assert forced.constraint_source == "tools"


def test_single_call_is_enforced_by_the_grammar(features):
    many = json.loads(
        features.resolve(request(tools=[WEATHER], tool_choice="required"))
        .sampling["structured_outputs"]
        .structural_tag
    )
    one = json.loads(
        features.resolve(
            request(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
        )
        .sampling["structured_outputs"]
        .structural_tag
    )
    assert many["format"]["stop_after_first"] is False
    assert one["format"]["stop_after_first"] is True


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": []}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
    ],
)
def test_tool_requests_refused(features, fields, param):
    with pytest.raises(BadRequest) as caught:
        features.resolve(request(**fields))
    assert caught.value.param == param


# ---- logprobs --------------------------------------------------------------------------------


def test_token_bytes_spell_the_text(tokenizer):
    """Byte-level pieces of multi-byte characters decode to U+FFFD one by one; their bytes
    joined are the text's UTF-8."""
    token_bytes = TokenBytes(tokenizer)
    text = "Größe: 3 € — 猫 ✓ <|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [token_bytes.of(i, tokenizer.decode([i])) for i in ids]
    assert b"".join(bytes(piece) for piece in pieces) == text.encode("utf-8")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the case this is for


def test_chat_logprobs_orders_alternatives_by_rank(tokenizer):
    from vllm.logprobs import Logprob

    token_bytes = TokenBytes(tokenizer)
    step = {
        9: Logprob(-3.0, rank=7, decoded_token="c"),  # sampled, outside the top 2
        4: Logprob(-0.5, rank=1, decoded_token="a"),
        5: Logprob(-1.0, rank=2, decoded_token="b"),
    }
    sure = {4: Logprob(float("-inf"), rank=1, decoded_token="a")}
    (first, second) = chat_logprobs([9, 4], [step, sure], 2, token_bytes)
    assert (first.token, first.logprob) == ("c", -3.0)
    assert [(alt.token, alt.logprob) for alt in first.top_logprobs] == [("a", -0.5), ("b", -1.0)]
    assert second.logprob == -9999.0  # -inf is not JSON
    (only,) = chat_logprobs([9], [step], 0, token_bytes)
    assert only.top_logprobs == []


# ---- tool rendering --------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rain"}]},
]


def test_tools_and_tool_messages_render_as_transformers_renders_them(tokenizer):
    builder = PromptBuilder(tokenizer, ImageTokens())
    messages = [ChatMessage.model_validate(m) for m in HISTORY]
    prompt = builder.tokenize(messages, tools=[WEATHER])
    # transformers' own rendering of the same chat, in its conventions (arguments as objects).
    reference = [{**m, "content": "rain"} if m.get("tool_call_id") == "c2" else m for m in HISTORY]
    reference[2] = {
        **HISTORY[2],
        "tool_calls": [
            {
                **call,
                "function": {
                    **call["function"],
                    "arguments": json.loads(call["function"]["arguments"]),
                },
            }
            for call in HISTORY[2]["tool_calls"]
        ],
    }
    expected = tokenizer.apply_chat_template(
        reference, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    assert prompt.token_ids == tokenizer.encode(expected, add_special_tokens=False)
    text = tokenizer.decode(prompt.token_ids)
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert (
        "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>" in text
    )
    assert '"name": "get_weather"' in text.split("</tools>")[0]  # the signature in the system turn


def test_a_chat_without_tools_renders_as_before(tokenizer):
    builder = PromptBuilder(tokenizer, ImageTokens())
    messages = [ChatMessage.model_validate(m) for m in HISTORY[:2]]
    text = tokenizer.decode(builder.tokenize(messages).token_ids)
    assert text == (
        "<|im_start|>system\nYou answer weather questions.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- choices: whole answers and streams ------------------------------------------------------


def _feed(tokenizer, output: ChoiceOutput, text: str) -> list[Any]:
    """Token by token, as vLLM's DELTA outputs would bring it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = []
    for i, token in enumerate(ids):
        piece = tokenizer.decode(ids[: i + 1])[len(tokenizer.decode(ids[:i])) :]
        completion = SimpleNamespace(
            token_ids=[token],
            text=piece,
            logprobs=None,
            finish_reason="stop" if i == len(ids) - 1 else None,
        )
        chunk = output.add(completion)
        if chunk is not None:
            chunks.append(chunk)
    return chunks


@pytest.mark.parametrize(
    ("answer", "content", "cities"),
    [
        (
            "I will look. <tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
            "I will look. ",
            ["Rome"],
        ),
        (
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
            "",
            ["Paris", "Rome"],
        ),
        (
            "No call here, only a dangling <tool",
            "No call here, only a dangling <tool",
            [],
        ),
        ("Plain text.", "Plain text.", []),
    ],
    ids=["text-then-call", "two-calls", "held-back-tag", "plain"],
)
def test_streamed_tool_calls_concatenate_to_the_whole_answer(
    features, tokenizer, answer, content, cities
):
    options = features.resolve(request(tools=[WEATHER])).output
    whole = ChoiceOutput(0, options, streaming=False)
    _feed(tokenizer, whole, answer)
    expected = whole.choice()
    # The whole answer is what the model wrote: its text, and each call it made, in order.
    assert (expected.message.content or "") == content
    assert [
        (call.function.name, json.loads(call.function.arguments))
        for call in expected.message.tool_calls or []
    ] == [("get_weather", {"city": city}) for city in cities]
    chunks = _feed(tokenizer, ChoiceOutput(0, options, streaming=True), answer)

    content = "".join(chunk.delta.content or "" for chunk in chunks)
    assert content == (expected.message.content or "")
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for piece in chunk.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"name": "", "arguments": ""})
            if piece.id is not None:
                assert piece.function is not None and piece.function.arguments == ""
            if piece.function is not None:
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    expected_calls = expected.message.tool_calls or []
    assert [c["name"] for c in calls.values()] == [c.function.name for c in expected_calls]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [
        json.loads(c.function.arguments) for c in expected_calls
    ]
    assert chunks[-1].finish_reason == expected.finish_reason
    assert expected.finish_reason == ("tool_calls" if expected_calls else "stop")

"""OpenAI API parity, end to end: structured outputs, logprobs, logit_bias and tools through
the running services (the session ``stacks``), checked against transformers' InternVL on the
same tiny checkpoint and against the ``jsonschema`` library.

The tiny model has random weights: whatever valid JSON or well-formed tool call comes back is
the work of the constraint, and the tests show that the same request without it does not
give one."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from chats import image_part, stream_chunks, wire
from helpers import gradient_image, noise_image
from margins import MARGIN_PARAMS, compare_greedy, served_margins
from pydantic import BaseModel, Field
from reference import TransformersOracle, to_oracle_messages

pytestmark = pytest.mark.slow

MODEL = "dvd-tiny-internvl"
IMAGE = noise_image(448, 448, seed=11)  # one tile
FORM = gradient_image(896, 448, seed=12)  # two tiles + thumbnail


TEXT_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Which colour is the sky at noon?"},
]
IMAGE_CHAT = [
    {
        "role": "user",
        "content": [image_part(IMAGE), {"type": "text", "text": "What is in this picture?"}],
    }
]
FORM_CHAT = [
    {
        "role": "user",
        "content": [image_part(FORM), {"type": "text", "text": "Read the invoice as JSON."}],
    }
]


def post(base_url: str, messages, timeout: float = 180, **params) -> httpx.Response:
    body = {"model": MODEL, "messages": wire(messages), **params}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)


def chat(base_url: str, messages, **params) -> dict[str, Any]:
    reply = post(base_url, messages, **params)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture(scope="module")
def base_url(stacks) -> str:
    return stacks["hf"].base_url


@pytest.fixture(scope="module")
def oracle(tiny_models) -> TransformersOracle:
    return TransformersOracle(tiny_models["hf"])


# ---- logprobs --------------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", ["text", "image"])
def test_logprobs_equal_transformers_log_softmax(base_url, oracle, conversation):
    messages = TEXT_CHAT if conversation == "text" else IMAGE_CHAT
    converted, images = to_oracle_messages(messages)
    expected = oracle.generate(converted, images, max_new_tokens=16)
    reply = chat(
        base_url,
        messages,
        temperature=0,
        max_tokens=16,
        logprobs=True,
        top_logprobs=5,
        return_token_ids=True,
    )
    choice = reply["choices"][0]
    # The same tokens up to the first near tie where the runs part (margins.py); past it the
    # log-probabilities belong to another prefix.
    comparison = compare_greedy(
        choice["token_ids"],
        expected.token_ids,
        [expected.margins, served_margins(choice)],
        min_compared=8,
        what=f"{conversation} chat against transformers",
    )
    entries = choice["logprobs"]["content"]
    assert len(entries) == len(choice["token_ids"])
    compared = zip(expected.token_ids[: comparison.compared], entries, strict=False)
    for step, (token_id, entry) in enumerate(compared):
        row = expected.logprobs[step]
        assert entry["logprob"] == pytest.approx(float(row[token_id]), abs=1e-3)
        top = row.topk(5)
        assert [alt["logprob"] for alt in entry["top_logprobs"]] == pytest.approx(
            top.values.tolist(), abs=1e-3
        )
        # The greedy token is the most likely one; each alternative is the token it names.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        for alt, alt_id in zip(entry["top_logprobs"], top.indices.tolist(), strict=True):
            text = oracle.tokenizer.decode([alt_id])
            if "\ufffd" not in text:
                assert alt["token"] == text
    # The tokens' bytes spell the answer (the served one, whether or not it parted).
    answer = b"".join(bytes(entry["bytes"]) for entry in entries)
    assert answer.decode("utf-8", errors="replace").startswith(choice["message"]["content"])


def test_streamed_logprobs_concatenate_to_the_whole_answer(base_url):
    params = {"temperature": 0, "max_tokens": 16, "logprobs": True, "top_logprobs": 3}
    whole = chat(base_url, IMAGE_CHAT, **params)["choices"][0]
    chunks = stream_chunks(base_url, IMAGE_CHAT, **params)
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    streamed = [
        entry
        for choice in choices
        if choice.get("logprobs")
        for entry in choice["logprobs"]["content"]
    ]
    assert streamed == whole["logprobs"]["content"]
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["message"]["content"]


def test_top_logprobs_bounds(base_url):
    reply = chat(base_url, TEXT_CHAT, max_tokens=3, logprobs=True, top_logprobs=20)
    assert all(len(e["top_logprobs"]) == 20 for e in reply["choices"][0]["logprobs"]["content"])
    reply = chat(base_url, TEXT_CHAT, max_tokens=3, logprobs=True)
    assert all(e["top_logprobs"] == [] for e in reply["choices"][0]["logprobs"]["content"])
    assert "logprobs" not in chat(base_url, TEXT_CHAT, max_tokens=3)["choices"][0]
    for params, fragment in (
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ):
        reply = post(base_url, TEXT_CHAT, max_tokens=3, **params)
        assert reply.status_code == 400, reply.text
        assert fragment in reply.json()["error"]["message"]


# ---- logit_bias ------------------------------------------------------------------------------


def test_logit_bias_plus_100_makes_the_token_the_output(base_url, oracle):
    (blue,) = oracle.tokenizer.encode(" blue", add_special_tokens=False)
    reply = chat(
        base_url,
        IMAGE_CHAT,
        max_tokens=6,
        temperature=1.0,
        seed=3,
        logit_bias={str(blue): 100},
        return_token_ids=True,
    )
    choice = reply["choices"][0]
    assert choice["token_ids"] == [blue] * 6
    assert choice["message"]["content"] == " blue" * 6


def test_logit_bias_minus_100_bans_the_greedy_token(base_url):
    plain = chat(base_url, TEXT_CHAT, max_tokens=4, temperature=0, return_token_ids=True)
    first = plain["choices"][0]["token_ids"][0]
    banned = chat(
        base_url,
        TEXT_CHAT,
        max_tokens=4,
        temperature=0,
        return_token_ids=True,
        logit_bias={str(first): -100},
    )
    assert first not in banned["choices"][0]["token_ids"]


@pytest.mark.parametrize(
    ("logit_bias", "fragment"),
    [
        ({"2048": 5}, "2048"),
        ({"-1": 5}, "-1"),
        ({"blue": 5}, "blue"),
        ({"5": 101}, "logit_bias"),
    ],
)
def test_invalid_logit_bias_is_refused(base_url, logit_bias, fragment):
    reply = post(base_url, TEXT_CHAT, max_tokens=2, logit_bias=logit_bias)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"].startswith("logit_bias") and fragment in error["message"]


# ---- structured outputs ----------------------------------------------------------------------

SCHEMAS: dict[str, dict[str, Any]] = {
    "enum": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    },
    "integer_bounds": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": 3, "maximum": 7},
            "offset": {"type": "integer", "minimum": -5, "maximum": -1},
        },
        "required": ["count", "offset"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "animals": {
                "type": "array",
                "items": {"enum": ["cat", "dog", "bird"]},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["animals"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "invoice": {
                "type": "object",
                "properties": {
                    "total": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "paid": {"type": "boolean"},
                    "lines": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "sku": {"enum": ["A1", "B2", "C3"]},
                                "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                            },
                            "required": ["sku", "quantity"],
                            "additionalProperties": False,
                        },
                        "minItems": 1,
                        "maxItems": 3,
                    },
                },
                "required": ["total", "paid", "lines"],
                "additionalProperties": False,
            }
        },
        "required": ["invoice"],
        "additionalProperties": False,
    },
}


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def _valid(text: str | None, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text or ""), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(base_url, name):
    schema = SCHEMAS[name]
    messages = FORM_CHAT if name == "nested" else IMAGE_CHAT
    params = {"temperature": 0, "max_tokens": 400}
    free = chat(base_url, messages, **params)["choices"][0]["message"]["content"]
    assert not _valid(free, schema)  # the random model does not answer JSON on its own
    reply = chat(base_url, messages, response_format=json_schema_format(schema), **params)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_sampled_json_schema_outputs_validate(base_url):
    schema = SCHEMAS["nested"]
    reply = chat(
        base_url,
        FORM_CHAT,
        temperature=1.0,
        seed=7,
        n=3,
        max_tokens=1500,  # sampled, the random model pads the JSON with much whitespace
        response_format=json_schema_format(schema),
    )
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_output_is_a_json_object(base_url):
    # Free-form JSON lets a random model write one endless string; this prompt's greedy answer
    # ends, and without the constraint it is not JSON.
    messages = [{"role": "user", "content": "Tell me about the sky at night."}]
    free = chat(base_url, messages, temperature=0, max_tokens=100)["choices"][0]["message"]
    assert not _valid(free["content"], {"type": "object"})
    reply = chat(
        base_url, messages, temperature=0, max_tokens=100, response_format={"type": "json_object"}
    )
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_streamed_json_concatenates_to_the_whole_answer(base_url):
    params = {
        "temperature": 0,
        "max_tokens": 400,
        "response_format": json_schema_format(SCHEMAS["array"]),
    }
    whole = chat(base_url, IMAGE_CHAT, **params)["choices"][0]
    chunks = stream_chunks(base_url, IMAGE_CHAT, **params)
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["message"]["content"]
    assert choices[-1]["finish_reason"] == whole["finish_reason"] == "stop"


class Reading(BaseModel):
    colour: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=9)
    animals: list[Literal["cat", "dog"]] = Field(max_length=3)
    urgent: bool


def test_openai_client_parse_with_a_pydantic_model(base_url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=wire(IMAGE_CHAT),  # type: ignore[arg-type]
        response_format=Reading,
        temperature=0,
        max_tokens=400,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Reading)
    assert Reading.model_validate_json(message.content or "") == message.parsed


INVALID_SCHEMAS = [
    # not a JSON Schema at all (the metaschema says why)
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}, "zero"),
    # a JSON Schema, but one the grammar backend cannot enforce
    ({"type": "string", "pattern": "(?<=x)y"}, "look-around"),
    ({"$ref": "#/definitions/missing"}, "missing"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("schema", "reason"), INVALID_SCHEMAS, ids=["meta", "pattern", "ref"])
def test_invalid_schema_is_a_400_with_the_reason(base_url, stream, schema, reason):
    reply = post(
        base_url, TEXT_CHAT, max_tokens=4, stream=stream, response_format=json_schema_format(schema)
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"].startswith("response_format") and reason in error["message"], error


def test_unknown_response_format_type_is_refused(base_url):
    reply = post(base_url, TEXT_CHAT, max_tokens=4, response_format={"type": "xml"})
    assert reply.status_code == 400
    assert "response_format" in reply.json()["error"]["message"]


# ---- tools -----------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 5},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMA_OF = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
WEATHER_CHAT = [{"role": "user", "content": "What is the weather in Paris this week?"}]


def check_calls(choice: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    calls = message["tool_calls"]
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"]
        assert call["function"]["name"] in names
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMA_OF[call["function"]["name"]])
    return calls


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ],
    ids=["required", "named"],
)
@pytest.mark.parametrize("messages", [WEATHER_CHAT, IMAGE_CHAT], ids=["text", "image"])
def test_forced_tool_calls_parse_and_name_the_function(base_url, tool_choice, names, messages):
    free = chat(base_url, messages, temperature=0, max_tokens=200, tools=TOOLS)["choices"][0]
    assert "tool_calls" not in free["message"]  # unforced, the random model calls nothing
    assert free["finish_reason"] != "tool_calls"
    reply = chat(
        base_url,
        messages,
        temperature=0,
        max_tokens=200,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
    )
    calls = check_calls(reply["choices"][0], names)
    assert len(calls) == 1


def test_parallel_tool_calls_all_parse(base_url):
    reply = chat(
        base_url,
        IMAGE_CHAT,
        temperature=1.0,
        seed=5,
        n=3,
        max_tokens=400,
        tools=TOOLS,
        tool_choice="required",
    )
    finished = [c for c in reply["choices"] if c["finish_reason"] != "length"]
    assert finished  # (a choice may be a long row of calls cut short)
    for choice in finished:
        check_calls(choice, set(SCHEMA_OF))


def test_streamed_tool_calls_concatenate_to_the_whole_answer(base_url):
    params = {
        "temperature": 0,
        "max_tokens": 200,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    whole = chat(base_url, IMAGE_CHAT, **params)["choices"][0]
    (expected,) = check_calls(whole, {"get_weather"})
    chunks = stream_chunks(base_url, IMAGE_CHAT, **params)
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    calls: dict[int, dict[str, str]] = {}
    for choice in choices:
        assert not choice["delta"].get("content")
        for piece in choice["delta"].get("tool_calls") or []:
            call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
            if "id" in piece:
                assert not call["id"] and piece["type"] == "function"  # one first piece per call
                call["id"] = piece["id"]
            function = piece.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
    assert list(calls) == [0] and calls[0]["id"]
    assert calls[0]["name"] == expected["function"]["name"]
    assert json.loads(calls[0]["arguments"]) == json.loads(expected["function"]["arguments"])
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_openai_client_reads_tool_calls(base_url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_CHAT,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=200,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name in SCHEMA_OF  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    jsonschema.validate(arguments, SCHEMA_OF[call.function.name])  # type: ignore[union-attr]


TOOL_HISTORY = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "What is the weather in Paris and in Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain, 14 C"},
]


def test_tool_history_renders_as_transformers_renders_it(base_url, oracle):
    converted, _ = to_oracle_messages(TOOL_HISTORY)
    expected = oracle.generate(converted, [], max_new_tokens=16, tools=TOOLS)
    reply = chat(
        base_url,
        TOOL_HISTORY,
        temperature=0,
        max_tokens=16,
        tools=TOOLS,
        return_token_ids=True,
        **MARGIN_PARAMS,
    )
    assert reply["usage"]["prompt_tokens"] == expected.num_prompt_tokens
    choice = reply["choices"][0]
    compare_greedy(
        choice["token_ids"],
        expected.token_ids,
        [expected.margins, served_margins(choice)],
        min_compared=8,
        what="the answer after the tool results, against transformers",
    )


def test_tool_choice_none_shows_no_tools_and_auto_shows_them(base_url):
    def prompt_tokens(**params) -> int:
        reply = chat(base_url, WEATHER_CHAT, max_tokens=1, **params)
        return int(reply["usage"]["prompt_tokens"])

    plain = prompt_tokens()
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == plain
    assert prompt_tokens(tools=TOOLS) > plain + 50
    assert prompt_tokens(tools=TOOLS, tool_choice="auto") > plain + 50


@pytest.mark.parametrize(
    ("params", "param", "fragment"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": []}, "tools", "empty"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
            "tools.0.function.parameters",
            "not a valid JSON Schema",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
            "cannot be combined",
        ),
    ],
    ids=["choice-without-tools", "empty", "unknown-name", "duplicate", "bad-schema", "with-json"],
)
def test_invalid_tool_requests_are_refused(base_url, params, param, fragment):
    reply = post(base_url, WEATHER_CHAT, max_tokens=2, **params)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


# ---- what is still refused, and the engine input path ------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
        ("function_call", "auto"),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
    ],
)
def test_unsupported_fields_are_refused_by_name(base_url, field, value):
    reply = post(base_url, TEXT_CHAT, max_tokens=2, **{field: value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and field in error["message"]


RAW_PROMPT_WARNING = "Passing raw prompts to InputProcessor is deprecated"


def test_engine_inputs_take_vllms_supported_path(stacks, base_url):
    """vLLM logs a deprecation once when ``generate`` gets a raw prompt: after text and image
    requests (plain token ids and mixed prompt embeddings), the log has none. The absence
    means something: the installed vLLM still words the warning so, where the API process
    hands prompts to its engine, and that process's vLLM log lines reach this log."""
    import inspect

    from vllm.v1.engine.input_processor import InputProcessor

    assert RAW_PROMPT_WARNING in inspect.getsource(InputProcessor), (
        "the installed vLLM words its raw-prompt deprecation differently: update this test"
    )
    chat(base_url, TEXT_CHAT, max_tokens=2)
    chat(base_url, IMAGE_CHAT, max_tokens=2)
    log = stacks["hf"].llm.log_path.read_text(errors="replace")
    assert "language engine ready" in log
    # vLLM's own logger, in the API process (where AsyncLLM's InputProcessor runs).
    assert re.search(r"^\(MainProcess pid=\d+\) (INFO|WARNING) ", log, flags=re.MULTILINE)
    assert RAW_PROMPT_WARNING not in log

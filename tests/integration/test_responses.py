"""``/v1/responses`` end to end, with the official ``openai`` client (``responses.create``
and ``responses.stream``) on the session's "hf" stack: the answer equals chat's for the same
conversation (images included), the streamed event sequence, stored responses continued with
``previous_response_id`` (an unknown one is a 404), function calls, JSON schemas, DvD's
extensions. The store's size and age bounds are checked without a server."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from helpers import data_url, gradient_image, noise_image
from openai import OpenAI

from llm_server.api.protocol import ChatMessage
from llm_server.api.response_protocol import ResponseObject
from llm_server.api.response_store import ResponseStore

MODEL = "dvd-tiny-internvl"
IMAGE = noise_image(448, 448, seed=21)  # one tile
WIDE = gradient_image(896, 448, seed=22)  # two tiles + thumbnail
INSTRUCTIONS = "You are a careful assistant."
QUESTION = "What is in this picture?"
MAX_TOKENS = 16

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def client(stacks) -> OpenAI:
    return OpenAI(base_url=f"{stacks['hf'].base_url}/v1", api_key="unused", max_retries=0)


def image_input(image=IMAGE, text: str = QUESTION, **image_fields: Any) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": data_url(image), **image_fields},
                {"type": "input_text", "text": text},
            ],
        }
    ]


def chat_answer(client: OpenAI, messages: list[dict[str, Any]], **params: Any):
    params = {"temperature": 0, "max_tokens": MAX_TOKENS, **params}
    return client.chat.completions.create(model=MODEL, messages=messages, **params)


def chat_image_message(image=IMAGE, text: str = QUESTION) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": text},
        ],
    }


pytestmark = pytest.mark.slow


def test_answer_equals_chat_for_the_same_conversation(client):
    response = client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input=image_input(),
        temperature=0,
        max_output_tokens=MAX_TOKENS,
    )
    chat = chat_answer(client, [{"role": "system", "content": INSTRUCTIONS}, chat_image_message()])
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert len(response.output_text) > 0
    # Cut short by max_output_tokens, as vLLM reports it.
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    usage = response.usage
    assert usage.input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == chat.usage.completion_tokens == MAX_TOKENS
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.model_extra["image_tokens"] == 256
    assert response.model_extra["vision"]["images"] == 1
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"


def test_a_string_input_is_one_user_message(client):
    response = client.responses.create(
        model=MODEL, input="Tell me about the sky.", temperature=0, max_output_tokens=8
    )
    chat = chat_answer(
        client, [{"role": "user", "content": "Tell me about the sky."}], max_tokens=8
    )
    assert response.output_text == chat.choices[0].message.content


def test_stream_sends_the_documented_event_sequence(client):
    whole = client.responses.create(
        model=MODEL, input=image_input(), temperature=0, max_output_tokens=MAX_TOKENS, store=False
    )
    with client.responses.stream(
        model=MODEL, input=image_input(), temperature=0, max_output_tokens=MAX_TOKENS
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(event.delta for event in deltas)
    assert text == whole.output_text == final.output_text
    item_id = events[2].item.id
    assert all(event.item_id == item_id for event in deltas)
    assert final.id == events[0].response.id and final.usage.output_tokens == MAX_TOKENS


def test_previous_response_id_continues_the_stored_conversation(client):
    first = client.responses.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input=image_input(),
        temperature=0,
        max_output_tokens=MAX_TOKENS,
    )
    follow_up = "Which colour is the most common?"
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=follow_up,
        temperature=0,
        max_output_tokens=MAX_TOKENS,
    )
    # Instructions are not carried over (as in OpenAI's API): the history is the messages.
    chat = chat_answer(
        client,
        [
            chat_image_message(),
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": follow_up},
        ],
    )
    assert second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.usage.input_tokens_details.model_extra["image_tokens"] == 256
    # Stored responses can be read back.
    assert client.responses.retrieve(first.id).output_text == first.output_text


def test_unknown_and_unstored_ids_are_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")
    error = caught.value.body
    assert error["code"] == "previous_response_not_found"
    assert error["param"] == "previous_response_id"
    assert error["type"] == "invalid_request_error"
    unstored = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="hi", previous_response_id=unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    stored = client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stored.id)


def test_forced_function_call_and_its_result(client):
    response = client.responses.create(
        model=MODEL,
        input=image_input(text="What is the weather in the city of this picture?"),
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,  # one call, then the answer ends
        max_output_tokens=200,
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")
    # The result goes back with the call's id; the conversation continues from the store.
    answer = client.responses.create(
        model=MODEL,
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=8,
    )
    assert answer.output[0].type == "message"


def test_streamed_function_call(client):
    with client.responses.stream(
        model=MODEL,
        input="What is the weather in Rome?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=200,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    call = next(item for item in final.output if item.type == "function_call")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(call.arguments) == json.loads(done.arguments)
    assert call.name == "get_weather"


def test_json_schema_text_format(client):
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL,
        input=image_input(text="Describe the picture as JSON."),
        text={"format": {"type": "json_schema", "name": "picture", "schema": schema}},
        max_output_tokens=400,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"


def test_dvd_extensions_and_detail_work_as_in_chat(client):
    tiled = client.responses.create(model=MODEL, input=image_input(WIDE), max_output_tokens=2)
    assert tiled.usage.input_tokens_details.model_extra["image_tokens"] == 3 * 256
    one_tile = client.responses.create(
        model=MODEL, input=image_input(WIDE), max_output_tokens=2, extra_body={"max_tiles": 1}
    )
    low = client.responses.create(
        model=MODEL, input=image_input(WIDE, detail="low"), max_output_tokens=2
    )
    assert one_tile.usage.input_tokens_details.model_extra["image_tokens"] == 256
    assert low.usage.input_tokens_details.model_extra["image_tokens"] == 256


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"extra_body": {"max_tiles": 10**6}}, "max_tiles"),
        ({"max_output_tokens": 10**7}, "input"),  # the context, as chat names it
        (
            {
                "input": [
                    {"role": "assistant", "content": [{"type": "input_image", "image_url": "x"}]}
                ]
            },
            "input",
        ),
    ],
)
def test_refusals(client, params, param):
    body = {"model": MODEL, "input": "hi", **params}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**body)
    assert caught.value.body["param"] == param, caught.value.body


# ---- the store, without a server ---------------------------------------------------------------


def _stored(response_id: str, text: str) -> tuple[ResponseObject, list[ChatMessage]]:
    response = ResponseObject(id=response_id, model=MODEL)
    return response, [ChatMessage.model_validate({"role": "user", "content": text})]


def test_store_expires_entries_after_their_ttl(monkeypatch):
    import llm_server.api.response_store as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    store = ResponseStore(max_bytes=1 << 20, ttl_s=60)
    store.put(*_stored("resp_a", "a"), size=10)
    now[0] += 30
    store.put(*_stored("resp_b", "b"), size=10)
    now[0] += 31  # a has lived 61 s, b 31 s
    assert store.get("resp_a") is None and store.get("resp_b") is not None
    assert store.bytes == 10 and len(store) == 1


def test_store_evicts_the_oldest_when_full():
    store = ResponseStore(max_bytes=100, ttl_s=3600)
    for name in "abc":
        assert store.put(*_stored(f"resp_{name}", name), size=40)
    assert store.get("resp_a") is None  # 3 x 40 > 100: the oldest left
    assert store.get("resp_b") is not None and store.get("resp_c") is not None
    assert store.bytes == 80
    assert not store.put(*_stored("resp_big", "big"), size=101)  # never fits: not stored
    assert store.get("resp_big") is None and store.bytes == 80

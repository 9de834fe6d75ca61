"""``/tokenize`` and ``/detokenize`` on the running stacks: vLLM's request and response shapes
(checked with vLLM's own protocol models), texts tokenized as the checkpoint's tokenizer does,
and chats counted exactly as ``/v1/chat/completions`` prompts the model, each image as the
visual tokens the vision service gave it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from helpers import SERVED_MODEL_NAME, data_url, gradient_image, noise_image
from transformers import AutoTokenizer

IMAGE_CONTEXT = "<IMG_CONTEXT>"


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["hf"]))


def post(base_url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=120)


def image_chat(image_url: str, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def test_text_is_tokenized_as_the_checkpoints_tokenizer_does(stacks, tokenizer):
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeResponse

    base_url = stacks["hf"].base_url
    prompt = "The quick brown fox jumps over the lazy dog."
    reply = post(base_url, "/tokenize", {"prompt": prompt, "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    TokenizeResponse.model_validate(body)  # vLLM's own response model
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    expected = tokenizer.encode(prompt, add_special_tokens=True)
    assert body["tokens"] == expected and body["count"] == len(expected)
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(expected)
    models = httpx.get(f"{base_url}/v1/models", timeout=10).json()
    assert body["max_model_len"] == models["data"][0]["max_model_len"]
    # token_strs only when asked, null otherwise (as vLLM answers).
    plain = post(base_url, "/tokenize", {"model": SERVED_MODEL_NAME, "prompt": prompt}).json()
    assert plain["token_strs"] is None and plain["tokens"] == expected


def test_detokenize_round_trips(stacks, tokenizer):
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse

    base_url = stacks["hf"].base_url
    ids = tokenizer.encode("Hello, world! 123", add_special_tokens=False)
    reply = post(base_url, "/detokenize", {"model": SERVED_MODEL_NAME, "tokens": ids})
    assert reply.status_code == 200, reply.text
    DetokenizeResponse.model_validate(reply.json())
    assert reply.json() == {"prompt": tokenizer.decode(ids)}


def test_a_chat_counts_as_the_chat_completion_prompts_it(stacks):
    base_url = stacks["hf"].base_url
    messages = image_chat(data_url(noise_image(900, 500, seed=3)))
    reply = post(base_url, "/tokenize", {"messages": messages, "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    chat = post(
        base_url,
        "/v1/chat/completions",
        {"model": SERVED_MODEL_NAME, "messages": messages, "max_tokens": 1},
    ).json()
    usage = chat["usage"]
    assert body["count"] == len(body["tokens"]) == usage["prompt_tokens"]
    # The image is its visual tokens: context-image tokens, as many as it was encoded to.
    image_tokens = usage["prompt_tokens_details"]["image_tokens"]
    assert image_tokens > 0 and body["token_strs"].count(IMAGE_CONTEXT) == image_tokens
    # A larger image gets more tiles, hence more tokens.
    large = post(
        base_url, "/tokenize", {"messages": image_chat(data_url(noise_image(1800, 900, seed=4)))}
    ).json()
    assert large["count"] > body["count"]


def test_vir_changes_the_count_as_it_changes_the_prompt(stacks):
    """On the Flash checkpoint, the router's decision (the request's ``vir``) is counted."""
    base_url = stacks["flash"].base_url
    messages = image_chat(data_url(gradient_image(900, 500, seed=5)))
    counts = {}
    for vir in ("off", "max"):
        reply = post(base_url, "/tokenize", {"messages": messages, "vir": vir})
        assert reply.status_code == 200, reply.text
        chat = post(
            base_url,
            "/v1/chat/completions",
            {"model": SERVED_MODEL_NAME, "messages": messages, "max_tokens": 1, "vir": vir},
        ).json()
        counts[vir] = reply.json()["count"]
        assert counts[vir] == chat["usage"]["prompt_tokens"]
    # "max" compresses every tile to 64 tokens, "off" keeps 256.
    assert counts["max"] < counts["off"]


def test_template_options_as_vllm_takes_them(stacks, tokenizer):
    base_url = stacks["hf"].base_url
    messages = [{"role": "user", "content": "Hi there"}]
    opened = post(base_url, "/tokenize", {"messages": messages}).json()
    closed = post(
        base_url, "/tokenize", {"messages": messages, "add_generation_prompt": False}
    ).json()
    expected_open = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected_closed = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert opened["tokens"] == list(_ids(expected_open))
    assert closed["tokens"] == list(_ids(expected_closed))
    continued = [*messages, {"role": "assistant", "content": "Hello, I am"}]
    reply = post(
        base_url,
        "/tokenize",
        {"messages": continued, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["tokens"] == list(
        _ids(tokenizer.apply_chat_template(continued, continue_final_message=True))
    )


def _ids(encoded: Any) -> list[int]:
    """``apply_chat_template``'s token ids (a list, or a mapping with ``input_ids``)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_vllm_request_models_are_accepted(stacks):
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
    )

    base_url = stacks["hf"].base_url
    text = TokenizeCompletionRequest(model=SERVED_MODEL_NAME, prompt="Hello")
    chat = TokenizeChatRequest(
        model=SERVED_MODEL_NAME, messages=[{"role": "user", "content": "Hello"}]
    )
    for request in (text, chat):
        reply = post(base_url, "/tokenize", request.model_dump(mode="json"))
        assert reply.status_code == 200, reply.text
    detokenize = DetokenizeRequest(model=SERVED_MODEL_NAME, tokens=[1, 2, 3])
    assert post(base_url, "/detokenize", detokenize.model_dump(mode="json")).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
            400,
            None,
        ),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"},
            400,
            "chat_template",
        ),
        (
            "/tokenize",
            {"messages": image_chat("data:image/png;base64,AAAA")},
            400,
            None,
        ),
    ],
)
def test_errors_in_openai_shape(stacks, path, body, status, param):
    reply = post(stacks["hf"].base_url, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param

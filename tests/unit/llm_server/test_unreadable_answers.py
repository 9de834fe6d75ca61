"""What the model writes is never a 5xx: answers the parsers cannot read (malformed tool calls,
broken harmony messages, JSON nested past Python's recursion limit, random tokens) come back
as text, whole or streamed, as ``vllm serve`` returns them. No server: choices are fed by hand.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from checkpoints.tokenizer import HARMONY, save_tokenizer, train_tokenizer
from llm_server.api.choices import ChoiceOutput
from llm_server.api.features import OpenAIFeatures, OutputOptions
from llm_server.api.protocol import ChatCompletionRequest
from llm_server.api.tools import ToolPlan

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
DEEP = "[" * 5000  # json.loads raises RecursionError on it, not JSONDecodeError


def with_tools() -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    return ChatCompletionRequest.model_validate(body)


def feed(output: ChoiceOutput, pieces: list[tuple[list[int], str]]) -> list[Any]:
    """vLLM's increments, one per piece (token ids, text); the stream chunks returned."""
    chunks = []
    for i, (ids, text) in enumerate(pieces):
        last = i == len(pieces) - 1
        completion = SimpleNamespace(
            token_ids=ids, text=text, logprobs=None, finish_reason="stop" if last else None
        )
        chunk = output.add(completion)
        if chunk is not None:
            chunks.append(chunk)
    return chunks


def whole_and_streamed(options: OutputOptions, pieces: list[tuple[list[int], str]]):
    whole = ChoiceOutput(0, options, streaming=False)
    feed(whole, pieces)
    chunks = feed(ChoiceOutput(0, options, streaming=True), pieces)
    return whole.choice(), chunks


def streamed_content(chunks: list[Any]) -> str:
    return "".join(chunk.delta.content or "" for chunk in chunks)


# ---- a tool parser that fails ---------------------------------------------------------------


class ExplodingParser:
    """A vLLM tool parser that fails on whatever it is given (as a parser may on output it
    did not foresee)."""

    def __init__(self, tokenizer: Any, tools: list[Any]) -> None:
        pass

    def extract_tool_calls(self, text: str, request: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")

    def extract_tool_calls_streaming(self, *args: Any) -> Any:
        raise ValueError("unexpected token in a tool call")

    def get_remaining_unstreamed_args(self) -> str:
        raise AssertionError("not reached")


def exploding_options() -> OutputOptions:
    plan = ToolPlan(
        template_tools=None,
        structural_tag=None,
        parse=True,
        parser_class=ExplodingParser,
        tokenizer=None,
    )
    return OutputOptions(tools=plan)


def test_a_failing_tool_parser_returns_the_text_whole_and_streamed():
    pieces = [([1], "Calling "), ([2], "<tool_call>{"), ([3], '"name": ' + DEEP)]
    text = "".join(piece for _, piece in pieces)
    whole, chunks = whole_and_streamed(exploding_options(), pieces)
    assert whole.message.content == text
    assert whole.message.tool_calls is None and whole.finish_reason == "stop"
    assert streamed_content(chunks) == text
    assert chunks[-1].finish_reason == "stop"
    assert all(chunk.delta.tool_calls is None for chunk in chunks)


# ---- the hermes parser, fed garbage ---------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_models) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_models["hf"]))


@pytest.mark.parametrize(
    "answer",
    [
        '<tool_call>{"name": "get_weather", "arguments": ' + DEEP + "</tool_call>",
        "<tool_call>[1, 2, 3]</tool_call>",
        '<tool_call>{"name": 5, "arguments": {}}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        "<tool_call>not json at all",
        "</tool_call><tool_call><tool_call>{}",
    ],
    ids=["deep", "a list", "a numeric name", "no name", "not JSON", "tags only"],
)
def test_malformed_hermes_calls_are_text(qwen_tokenizer, answer):
    features = OpenAIFeatures(qwen_tokenizer, len(qwen_tokenizer), tool_parser="hermes")
    options = features.resolve(with_tools()).output
    ids = qwen_tokenizer.encode(answer, add_special_tokens=False)
    pieces = [([token], qwen_tokenizer.decode([token])) for token in ids]
    whole, chunks = whole_and_streamed(options, pieces)
    text = "".join(piece for _, piece in pieces)
    assert whole.message.tool_calls is None
    assert whole.message.content == text
    for chunk in chunks:  # whatever the stream made of it, it is well-formed
        assert chunk.index == 0


# ---- harmony, fed garbage -------------------------------------------------------------------


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("harmony-tokenizer")
    save_tokenizer(train_tokenizer(HARMONY), folder, HARMONY)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def harmony_options(harmony_tokenizer) -> OutputOptions:
    features = OpenAIFeatures(
        harmony_tokenizer, len(harmony_tokenizer), tool_parser="auto", backbone="gpt_oss"
    )
    return features.resolve(with_tools()).output


def harmony_pieces(tokenizer: Any, ids: list[int]) -> list[tuple[list[int], str]]:
    return [([token], tokenizer.decode([token], skip_special_tokens=True)) for token in ids]


def test_a_harmony_call_with_arguments_nested_too_deeply_is_text(
    harmony_tokenizer, harmony_options
):
    """vLLM's harmony parser reads a call's arguments with json.loads and only expects
    JSONDecodeError: nesting past the recursion limit raised out of it (a 500)."""
    answer = (
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        + DEEP
        + "<|call|>"
    )
    ids = harmony_tokenizer.encode(answer, add_special_tokens=False)
    pieces = harmony_pieces(harmony_tokenizer, ids)
    whole, chunks = whole_and_streamed(harmony_options, pieces)
    assert whole.message.tool_calls is None
    assert DEEP in (whole.message.content or "")
    assert chunks and chunks[-1].finish_reason is not None


def test_random_tokens_never_fail_a_harmony_answer(harmony_tokenizer, harmony_options):
    """Random token ids, harmony's markers among them in any order: every answer reads, whole
    and streamed, without an exception."""
    markers = harmony_tokenizer.convert_tokens_to_ids(
        ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|call|>"]
    )
    words = harmony_tokenizer.encode(
        'commentary to=functions.get_weather json final analysis {"city": [1, {',
        add_special_tokens=False,
    )
    rng = random.Random(0)
    for _ in range(60):
        ids = [
            rng.choice(markers + words * 3 + [rng.randrange(len(harmony_tokenizer))])
            for _ in range(rng.randrange(1, 40))
        ]
        whole, chunks = whole_and_streamed(harmony_options, harmony_pieces(harmony_tokenizer, ids))
        assert whole.index == 0 and all(chunk.index == 0 for chunk in chunks)

"""GPT-OSS answers in the harmony format, without a server: the final channel is the content,
the analysis channel the reasoning, commentary to a function a tool call; whole answers and
streams (token by token, as vLLM's DELTA outputs bring them) agree.

The answers are written out by hand in harmony's format and tokenized with the tiny GPT-OSS
tokenizer, whose ids are not harmony's own; the expected fields are written out by hand too.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from checkpoints.tokenizer import HARMONY, save_tokenizer, train_tokenizer
from llm_server.api.choices import ChoiceOutput
from llm_server.api.features import OpenAIFeatures, tool_parser_for
from llm_server.api.protocol import ChatCompletionRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("harmony-tokenizer")
    save_tokenizer(train_tokenizer(HARMONY), folder, HARMONY)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def features(tokenizer) -> OpenAIFeatures:
    return OpenAIFeatures(
        tokenizer, vocab_size=len(tokenizer), tool_parser="auto", backbone="gpt_oss"
    )


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def _feed(tokenizer, output: ChoiceOutput, ids: list[int], finish: str = "stop") -> list[Any]:
    """One token per increment; vLLM's text skips special tokens."""
    chunks = []
    for i, token in enumerate(ids):
        completion = SimpleNamespace(
            token_ids=[token],
            text=tokenizer.decode([token], skip_special_tokens=True),
            logprobs=None,
            finish_reason=finish if i == len(ids) - 1 else None,
        )
        chunk = output.add(completion)
        if chunk is not None:
            chunks.append(chunk)
    return chunks


def _both(features, tokenizer, answer: str | list[int], finish: str = "stop", **fields: Any):
    """(whole choice, stream chunks) of one answer (model output after <|start|>assistant)."""
    ids = answer if isinstance(answer, list) else tokenizer.encode(answer, add_special_tokens=False)
    options = features.resolve(request(**fields)).output
    whole = ChoiceOutput(0, options, streaming=False)
    _feed(tokenizer, whole, ids, finish)
    chunks = _feed(tokenizer, ChoiceOutput(0, options, streaming=True), ids, finish)
    return whole.choice(), chunks


def _streamed(chunks: list[Any], field: str) -> str:
    return "".join(getattr(chunk.delta, field) or "" for chunk in chunks)


def _streamed_calls(chunks: list[Any]) -> list[dict[str, Any]]:
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for piece in chunk.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"name": "", "arguments": ""})
            if piece.id is not None:  # the first piece: id, name, arguments ""
                assert piece.function is not None and piece.function.arguments == ""
                call["id"] = piece.id
            if piece.function is not None:
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    return list(calls.values())


def test_the_tiny_tokenizer_numbers_tokens_unlike_harmony(tokenizer):
    """So that the tests below exercise the carrying over of ids (harmony: <|message|> is
    200008, <|channel|> 200005)."""
    assert tokenizer.convert_tokens_to_ids(["<|message|>", "<|channel|>"]) != [200008, 200005]
    assert len(tokenizer) < 200_000


def test_the_final_channel_is_the_content(features, tokenizer):
    answer = "<|channel|>final<|message|>Two cats, a café ☕ and 42 mats.<|return|>"
    whole, chunks = _both(features, tokenizer, answer)
    assert whole.message.content == "Two cats, a café ☕ and 42 mats."
    assert whole.message.reasoning is None and whole.message.tool_calls is None
    assert whole.finish_reason == "stop"
    assert _streamed(chunks, "content") == whole.message.content
    assert len([c for c in chunks if c.delta.content]) > 5  # really streamed, not at the end
    assert _streamed(chunks, "reasoning") == ""
    assert chunks[-1].finish_reason == "stop"


def test_the_analysis_channel_is_the_reasoning(features, tokenizer):
    answer = (
        "<|channel|>analysis<|message|>The user says hi; answer briefly.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>"
    )
    whole, chunks = _both(features, tokenizer, answer)
    assert whole.message.reasoning == "The user says hi; answer briefly."
    assert whole.message.content == "Hello!"
    assert _streamed(chunks, "reasoning") == whole.message.reasoning
    assert _streamed(chunks, "content") == whole.message.content
    # Reasoning comes first, in its own deltas.
    first_content = next(i for i, c in enumerate(chunks) if c.delta.content)
    assert all(not c.delta.reasoning for c in chunks[first_content:])
    wire = whole.model_dump(exclude_none=True)["message"]
    assert wire["reasoning"] == "The user says hi; answer briefly."


CALL = (
    "<|channel|>analysis<|message|>Need the weather.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Rome"}<|call|>'
)


def test_a_commentary_message_to_a_function_is_a_tool_call(features, tokenizer):
    whole, chunks = _both(features, tokenizer, CALL, tools=[WEATHER])
    calls = whole.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert calls[0].id.startswith("chatcmpl-tool-")
    assert whole.message.content is None
    assert whole.message.reasoning == "Need the weather."
    assert whole.finish_reason == "tool_calls"
    streamed = _streamed_calls(chunks)
    assert [c["name"] for c in streamed] == ["get_weather"]
    assert json.loads(streamed[0]["arguments"]) == {"city": "Rome"}
    assert _streamed(chunks, "content") == ""
    assert chunks[-1].finish_reason == "tool_calls"


def test_without_tools_a_call_is_left_out(features, tokenizer):
    for fields in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        whole, chunks = _both(features, tokenizer, CALL, **fields)
        assert whole.message.tool_calls is None and whole.message.content is None
        assert whole.message.reasoning == "Need the weather."
        assert whole.finish_reason == "stop"
        assert _streamed_calls(chunks) == [] and _streamed(chunks, "content") == ""


def test_internvl_tokens_and_end_of_text_are_not_content(features, tokenizer):
    """InternVL's own special tokens are dropped as skip_special_tokens drops them; an
    <|endoftext|> that stopped generation is not part of the message either."""
    answer = "<|channel|>final<|message|>A <ref>dog</ref> in a <box>box</box>.<|endoftext|>"
    whole, chunks = _both(features, tokenizer, answer)
    assert whole.message.content == "A dog in a box."
    assert _streamed(chunks, "content") == "A dog in a box."


def test_a_character_cut_by_max_tokens_is_left_out(features, tokenizer):
    ids = tokenizer.encode("<|channel|>final<|message|>tea ☕", add_special_tokens=False)
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert pieces[-1] != "☕"  # the cup is several byte tokens
    whole, chunks = _both(features, tokenizer, ids[:-1], finish="length")
    assert whole.message.content == "tea "
    assert _streamed(chunks, "content") == "tea "
    assert whole.finish_reason == "length"


def test_an_answer_without_a_header_is_returned_raw(features, tokenizer):
    """Not a harmony message at all (no <|message|>): vLLM's parser gives back the text."""
    whole, chunks = _both(features, tokenizer, "just some words<|return|>")
    assert whole.message.content == "just some words"
    assert _streamed(chunks, "content") == "just some words"


def test_each_choice_reads_its_own_answer(features, tokenizer):
    options = features.resolve(request(n=2)).output
    outputs = [ChoiceOutput(i, options, streaming=True) for i in range(2)]
    answers = [
        tokenizer.encode(
            f"<|channel|>final<|message|>answer {i}<|return|>", add_special_tokens=False
        )
        for i in range(2)
    ]
    streamed = ["", ""]
    for step in range(max(len(a) for a in answers)):
        for i, ids in enumerate(answers):
            if step < len(ids):
                chunk = outputs[i].add(
                    SimpleNamespace(
                        token_ids=[ids[step]],
                        text="",
                        logprobs=None,
                        finish_reason="stop" if step == len(ids) - 1 else None,
                    )
                )
                streamed[i] += (chunk.delta.content or "") if chunk is not None else ""
    assert streamed == ["answer 0", "answer 1"]


def test_constraints_keep_the_harmony_header(features):
    """response_format and forced tool calls constrain what follows harmony's header, as
    vllm serve does for GPT-OSS, instead of replacing the header with JSON."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    resolved = features.resolve(
        request(response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    )
    tag = json.loads(resolved.sampling["structured_outputs"].structural_tag)
    text = json.dumps(tag)
    assert "<|channel|>final" in text and '"required": ["n"]' in text
    assert resolved.sampling["structured_outputs"].json is None
    forced = features.resolve(request(tools=[WEATHER], tool_choice="required"))
    assert forced.sampling["structured_outputs"].structural_tag is not None
    assert "to=functions.get_weather" in forced.sampling["structured_outputs"].structural_tag
    # Harmony answers are read from token ids: special tokens need not stay in the text.
    assert "skip_special_tokens" not in forced.sampling


@pytest.mark.parametrize(
    ("setting", "backbone", "parser"),
    [
        ("auto", "gpt_oss", "openai"),
        ("auto", "qwen3", "hermes"),
        ("auto", "qwen3_moe", "hermes"),
        ("openai", "gpt_oss", "openai"),
        ("hermes", "qwen3", "hermes"),
    ],
)
def test_the_tool_parser_follows_the_backbone(setting, backbone, parser):
    assert tool_parser_for(setting, backbone) == parser


@pytest.mark.parametrize(("setting", "backbone"), [("hermes", "gpt_oss"), ("openai", "qwen3")])
def test_a_tool_parser_for_another_format_is_refused(setting, backbone):
    with pytest.raises(ValueError, match="harmony"):
        tool_parser_for(setting, backbone)


def test_a_forced_call_is_planned_in_a_fresh_process(tmp_path):
    """The harmony grammar of a forced call is known to vLLM's registry from the start, not
    only once some answer has been read (this module's other tests read answers first)."""
    import subprocess
    import sys

    save_tokenizer(train_tokenizer(HARMONY), tmp_path, HARMONY)
    probe = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "from llm_server.api.features import OpenAIFeatures\n"
        "from llm_server.api.protocol import ChatCompletionRequest\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "features = OpenAIFeatures(tokenizer, len(tokenizer), 'auto', 'gpt_oss')\n"
        "body = {'model': 'm', 'messages': [{'role': 'user', 'content': 'hi'}],\n"
        "        'tools': [json.loads(sys.argv[2])], 'tool_choice': 'required'}\n"
        "resolved = features.resolve(ChatCompletionRequest.model_validate(body))\n"
        "print(resolved.sampling['structured_outputs'].structural_tag)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path), json.dumps(WEATHER)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "to=functions.get_weather" in result.stdout

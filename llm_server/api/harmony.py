"""GPT-OSS answers in OpenAI's harmony format -> content, reasoning and tool calls.

A GPT-OSS model answers in harmony messages. After the prompt's ``<|start|>assistant`` it
writes a header, ``<|message|>``, the text, and ``<|end|>`` (more messages follow),
``<|return|>`` (the answer is over) or ``<|call|>`` (a tool call is over). The header names a
channel: ``<|channel|>final`` for the answer, ``<|channel|>analysis`` for its reasoning,
``<|channel|>commentary to=functions.NAME <|constrain|>json`` for a call of a function.

They are read by vLLM's own harmony parser, the one ``vllm serve`` uses for GPT-OSS
(``vllm.parser.harmony.HarmonyParser`` over ``openai_harmony``'s streaming parser): the final
channel becomes ``content``, the analysis channel ``reasoning`` (vLLM's field), commentary
addressed to a function ``tool_calls``; whole for a response, incrementally for a stream.

That parser reads token ids of harmony's own encoding (``o200k_harmony``, bundled with
``openai_harmony``: no download). A checkpoint's tokenizer may number tokens differently (the
tiny checkpoints do; InternVL adds its image tokens), so each choice's tokens are carried over
to that encoding first: harmony's markers by name, text by its exact bytes (re-encoded once
whole characters are known). The checkpoint's other special tokens are dropped, as
``skip_special_tokens`` drops them from other answers; so are ``<|endoftext|>`` and
``<|startoftext|>``, which end or start a document and are not part of a message (the harmony
parser would otherwise copy an ``<|endoftext|>`` that stopped generation into the content).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from llm_server.api.logprobs import TokenBytes
from llm_server.api.protocol import FunctionCall, ToolCall, ToolCallDelta
from llm_server.api.tools import tool_call_deltas

# The tokens that give a harmony answer its structure, carried over by name.
HARMONY_MARKERS = (
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
)


class HarmonyVocabulary:
    """Server-wide: how the checkpoint's token ids map onto harmony's encoding."""

    def __init__(self, tokenizer: Any) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as VLLMChatRequest,
        )
        from vllm.entrypoints.openai.parser.harmony_utils import get_encoding

        # Registers harmony's structural tags (forced tool calls) with vLLM's registry now,
        # not on the first answer read.
        _parser_class(with_tools=True)

        vocab = tokenizer.get_vocab()
        missing = [marker for marker in HARMONY_MARKERS if marker not in vocab]
        if missing:
            raise ValueError(
                "a GPT-OSS checkpoint needs harmony's special tokens, and this tokenizer lacks "
                + ", ".join(missing)
            )
        self.encoding = get_encoding()
        self.markers = {
            vocab[marker]: self.encoding.encode(marker, allowed_special="all")[0]
            for marker in HARMONY_MARKERS
        }
        self.dropped = {
            token_id
            for token_id, added in tokenizer.added_tokens_decoder.items()
            if added.special and token_id not in self.markers
        }
        self.tokenizer = tokenizer
        self._token_bytes = TokenBytes(tokenizer)
        self._bytes: dict[int, bytes] = {}
        # What vLLM's parser reads from a request: only whether reasoning is included.
        self.vllm_request = VLLMChatRequest.model_validate({"messages": []})

    def bytes_of(self, token_id: int) -> bytes:
        """The exact bytes of an ordinary token (a byte-level token may hold part of a
        character)."""
        known = self._bytes.get(token_id)
        if known is None:
            text = self.tokenizer.decode([token_id])
            known = self._bytes[token_id] = bytes(self._token_bytes.of(token_id, text))
        return known

    def encode(self, text: str) -> list[int]:
        """``text`` as harmony token ids, marker look-alikes included as plain text."""
        return self.encoding.encode(text, disallowed_special=()) if text else []


class _HarmonyText:
    """What vLLM's parser decodes its (harmony) token ids with when an answer is not a
    well-formed harmony message and it returns the raw text instead: the text, special tokens
    skipped, as any other answer is returned (the stop token is not part of it)."""

    def __init__(self, encoding: Any) -> None:
        self.encoding = encoding

    def decode(self, token_ids: Sequence[int]) -> str:
        text = [t for t in token_ids if not self.encoding.is_special_token(t)]
        return str(self.encoding.decode(text))


class _TokenCarrier:
    """One choice's token ids, carried over to harmony's encoding as they arrive."""

    def __init__(self, vocabulary: HarmonyVocabulary) -> None:
        self.vocabulary = vocabulary
        # Holds back the bytes of a character split across tokens until it is whole.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def carry(self, token_ids: Sequence[int], finished: bool) -> list[int]:
        vocabulary = self.vocabulary
        out: list[int] = []
        text = ""
        for token_id in token_ids:
            marker = vocabulary.markers.get(token_id)
            if marker is not None:
                # A marker ends the text before it: bytes of a broken character are U+FFFD.
                text += self._utf8.decode(b"", final=True)
                out += vocabulary.encode(text)
                out.append(marker)
                text = ""
            elif token_id not in vocabulary.dropped:
                text += self._utf8.decode(vocabulary.bytes_of(token_id))
        out += vocabulary.encode(text)
        if finished:
            # A character cut by max_tokens is left out, as vLLM's detokenizer leaves it out.
            self._utf8.reset()
        return out


@cache
def _parser_class(with_tools: bool) -> type:
    from vllm.parser.harmony import HarmonyParser
    from vllm.reasoning.gptoss_reasoning_parser import GptOssReasoningParser
    from vllm.tool_parsers.gptoss_tool_parser import GptOssToolParser

    # vLLM composes these per server (``--reasoning-parser openai_gptoss --tool-call-parser
    # openai``); without a tool parser it reads no calls, and a call's message is left out
    # of the answer, as ``vllm serve`` leaves calls out when the request does not use tools.
    class Harmony(HarmonyParser):
        reasoning_parser_cls = GptOssReasoningParser
        tool_parser_cls = GptOssToolParser if with_tools else None

    return Harmony


@dataclass
class HarmonyDelta:
    """What one stream increment adds to a choice."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class HarmonyAnswer:
    """A whole answer, read."""

    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]


class HarmonyReader:
    """vLLM's harmony parser for one choice: stream increments, or a whole answer."""

    def __init__(self, vocabulary: HarmonyVocabulary, with_tools: bool) -> None:
        self.vocabulary = vocabulary
        self._parser_class = _parser_class(with_tools)
        self._stream: Any = None  # made on the first increment of a stream
        self._carrier = _TokenCarrier(vocabulary)

    def _new_parser(self) -> Any:
        parser = self._parser_class(self.vocabulary.tokenizer, None)
        parser.model_tokenizer = _HarmonyText(self.vocabulary.encoding)
        return parser

    def delta(self, token_ids: Sequence[int], finished: bool) -> HarmonyDelta:
        """Read the latest tokens of a stream (``finished``: they are the last)."""
        carried = self._carrier.carry(token_ids, finished)
        if self._stream is None:
            self._stream = self._new_parser()
        message = self._stream.parse_delta(
            "", carried, self.vocabulary.vllm_request, finished=finished
        )
        if message is None:
            return HarmonyDelta()
        return HarmonyDelta(
            content=message.content or None,
            reasoning=message.reasoning or None,
            tool_calls=tool_call_deltas(message.tool_calls),
        )

    def whole(self, token_ids: Sequence[int]) -> HarmonyAnswer:
        """Read a whole answer (a fresh parser: nothing of a stream is shared)."""
        from vllm.renderers.chat_utils import make_tool_call_id

        carried = _TokenCarrier(self.vocabulary).carry(token_ids, finished=True)
        reasoning, content, calls = self._new_parser().parse(
            "", self.vocabulary.vllm_request, model_output_token_ids=carried
        )
        return HarmonyAnswer(
            content=content,
            reasoning=reasoning,
            tool_calls=[
                ToolCall(
                    id=call.id or make_tool_call_id(),
                    function=FunctionCall(name=call.name, arguments=call.arguments),
                )
                for call in calls or []
            ],
        )


def harmony_structured_outputs(constraint: dict[str, Any], tokenizer: Any) -> Any:
    """vLLM's ``StructuredOutputsParams`` for a ``response_format`` constraint (``{"json":
    schema}`` or ``{"json_object": True}``) on a harmony model, made as ``vllm serve`` makes
    them: what is constrained is the final channel's message (after an optional analysis
    message), so the model still writes its header and the answer still parses, where a bare
    JSON grammar would force JSON in place of the header."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest as VLLMChatRequest,
    )

    if "json" in constraint:
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": constraint["json"]},
        }
    else:
        response_format = {"type": "json_object"}
    request = VLLMChatRequest.model_validate({"messages": [], "response_format": response_format})
    adjusted = _parser_class(with_tools=False)(tokenizer, None).adjust_request(request)
    return adjusted.structured_outputs

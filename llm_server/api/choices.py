"""One choice of a chat completion, built from vLLM's outputs as they arrive.

The same object serves both shapes of the API: ``delta`` turns each of vLLM's increments
into a stream chunk (text, tool-call pieces, logprobs), ``choice`` gives the whole answer.
Tool calls are read by vLLM's parser: incrementally for a stream, once for a whole answer;
``finish_reason`` becomes ``"tool_calls"`` when the model stopped after calling tools. A
GPT-OSS answer is read from its harmony messages instead (``harmony.py``): content, reasoning
and tool calls, by vLLM's harmony parser, from the token ids.

What the model writes is not the client's fault: an answer that a parser cannot read (a
malformed call, a broken harmony message, JSON nested past Python's recursion limit) is
returned as text, as ``vllm serve`` returns it, never as a 500 or a failed stream.
"""

from __future__ import annotations

import logging
from typing import Any

from llm_server.api.features import OutputOptions
from llm_server.api.harmony import HarmonyReader
from llm_server.api.logprobs import chat_logprobs
from llm_server.api.protocol import (
    AssistantMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionCallDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
)
from llm_server.api.tools import ToolCallParser

logger = logging.getLogger(__name__)


def _finish_reason(vllm_reason: str | None, called_tools: bool) -> str | None:
    return "tool_calls" if called_tools and vllm_reason == "stop" else vllm_reason


class ChoiceOutput:
    """Text, token ids, logprobs and tool calls of one choice."""

    def __init__(
        self, index: int, options: OutputOptions, streaming: bool, return_token_ids: bool = False
    ) -> None:
        self.index = index
        self.return_token_ids = return_token_ids
        self.options = options
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.vllm_finish_reason: str | None = None
        self.harmony: HarmonyReader | None = (
            HarmonyReader(options.harmony, with_tools=options.parses_tool_calls)
            if options.harmony is not None
            else None
        )
        self.parser: ToolCallParser | None = (
            options.tools.parser()
            if self.harmony is None and options.tools is not None and options.tools.parse
            else None
        )
        self.streaming = streaming
        self._content_sent = 0  # characters of text streamed as content (tool parsing only)
        self._calls_streamed = -1  # index of the last tool call streamed

    def _read_whole(self) -> tuple[str | None, str | None, list[ToolCall]]:
        """(content, reasoning, tool calls) of the whole answer, as the parsers read it."""
        if self.harmony is not None:
            answer = self.harmony.whole(self.token_ids)
            return answer.content, answer.reasoning, answer.tool_calls
        if self.parser is not None:
            content, calls = self.parser.extract(self.text)
            return content, None, calls
        return self.text, None, []

    def _logprobs_of(self, completion: Any) -> list[TokenLogprob]:
        if self.options.top_logprobs is None or completion.logprobs is None:
            return []
        assert self.options.token_bytes is not None
        return chat_logprobs(
            completion.token_ids,
            completion.logprobs,
            self.options.top_logprobs,
            self.options.token_bytes,
        )

    def add(self, completion: Any) -> ChunkChoice | None:
        """Take vLLM's next increment (``RequestOutputKind.DELTA``); when streaming, return
        the chunk for it, or None when there is nothing to send yet."""
        previous_text, previous_ids = self.text, self.token_ids
        new_ids = list(completion.token_ids)
        self.text = previous_text + completion.text
        self.token_ids = previous_ids + new_ids
        entries = self._logprobs_of(completion)
        self.logprobs.extend(entries)
        if completion.finish_reason is not None:
            self.vllm_finish_reason = completion.finish_reason
        if not self.streaming:
            return None
        content_sent = self._content_sent
        try:
            content, reasoning, calls = self._read_delta(
                completion, previous_text, previous_ids, new_ids
            )
        except Exception:
            self._content_sent = content_sent  # what this increment read was not sent
            content, reasoning, calls = self._read_as_text(completion.text), None, []
        finish = completion.finish_reason
        token_ids = new_ids if self.return_token_ids and new_ids else None
        if (
            not content
            and not reasoning
            and not calls
            and not entries
            and not token_ids
            and finish is None
        ):
            return None
        return ChunkChoice(
            index=self.index,
            delta=Delta(content=content or None, reasoning=reasoning, tool_calls=calls or None),
            finish_reason=_finish_reason(finish, self._calls_streamed >= 0),
            logprobs=ChoiceLogprobs(content=entries) if entries else None,
            token_ids=token_ids,
        )

    def _read_delta(
        self, completion: Any, previous_text: str, previous_ids: list[int], new_ids: list[int]
    ) -> tuple[str | None, str | None, list[ToolCallDelta]]:
        """(content, reasoning, call pieces) of one stream increment, as the parsers read it."""
        content: str | None = completion.text
        reasoning: str | None = None
        calls: list[ToolCallDelta] = []
        if self.harmony is not None:
            read = self.harmony.delta(new_ids, finished=completion.finish_reason is not None)
            content, reasoning, calls = read.content, read.reasoning, read.tool_calls
            if calls:
                self._calls_streamed = max(self._calls_streamed, *(call.index for call in calls))
        elif self.parser is not None:
            content, calls = self.parser.delta(
                previous_text,
                self.text,
                completion.text,
                previous_ids,
                self.token_ids,
                new_ids,
            )
            self._content_sent += len(content or "")
            if calls:
                self._calls_streamed = max(call.index for call in calls)
            if completion.finish_reason is not None:
                content, calls = self._flush(content, calls)
        return content, reasoning, calls

    def _read_as_text(self, delta_text: str) -> str | None:
        """A parser failed on this stream: from now on its text is streamed as content, the
        text a tool parser held back first."""
        logger.warning(
            "choice %d: the answer could not be parsed; streaming it as text",
            self.index,
            exc_info=True,
        )
        if self.parser is not None:
            delta_text = self.text[self._content_sent :]
            self._content_sent = len(self.text)
        self.harmony, self.parser = None, None
        return delta_text or None

    def _flush(
        self, content: str | None, calls: list[ToolCallDelta]
    ) -> tuple[str | None, list[ToolCallDelta]]:
        """At the end of a stream: text held back in case it began a call, and arguments
        the parser has read but not sent."""
        assert self.parser is not None
        if self._calls_streamed < 0:
            rest = self.text[self._content_sent :]
            self._content_sent = len(self.text)
            return (content or "") + rest or None, calls
        remaining = self.parser.unstreamed_arguments()
        if remaining:
            calls = [
                *calls,
                ToolCallDelta(
                    index=self._calls_streamed, function=FunctionCallDelta(arguments=remaining)
                ),
            ]
        return content, calls

    def choice(self) -> Choice:
        """The whole answer (for a response that is not streamed)."""
        try:
            content, reasoning, calls = self._read_whole()
        except Exception:
            logger.warning(
                "choice %d: the answer could not be parsed; returning it as text",
                self.index,
                exc_info=True,
            )
            content, reasoning, calls = self.text, None, []
        return Choice(
            index=self.index,
            message=AssistantMessage(
                content=content, reasoning=reasoning, tool_calls=calls or None
            ),
            finish_reason=_finish_reason(self.vllm_finish_reason, bool(calls)),
            logprobs=(
                ChoiceLogprobs(content=self.logprobs)
                if self.options.top_logprobs is not None
                else None
            ),
            token_ids=self.token_ids if self.return_token_ids else None,
        )

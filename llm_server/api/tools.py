"""Tool calling with vLLM's own pieces.

- The tools are rendered into the prompt by the checkpoint's chat template (``prompt.py``).
- The model's calls are read back by vLLM's tool parser for the model family (``hermes`` for
  Qwen3 backbones: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), whole for
  a response and incrementally for a stream.
- ``tool_choice="required"``, a named function, ``parallel_tool_calls=false`` and tools marked
  ``strict`` are enforced by structured outputs: the parser's structural tag (a grammar of
  the call format with each function's parameter schema) constrains decoding, so such calls
  are guaranteed to parse, name a declared function and carry arguments that fit its schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_server.api.protocol import (
    ChatCompletionRequest,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
)
from llm_server.api.structured import check_json_schema
from llm_server.errors import BadRequest


@dataclass
class ToolPlan:
    """How one request uses tools."""

    template_tools: list[dict[str, Any]] | None  # what the chat template renders
    structural_tag: str | None  # JSON of vLLM's structural tag, when calls are constrained
    parse: bool  # read calls back from the answer
    parser_class: Any = None
    tokenizer: Any = None
    vllm_tools: list[Any] = field(default_factory=list)
    vllm_request: Any = None  # the parser's view of the request

    def parser(self) -> ToolCallParser:
        """A fresh parser for one choice (streaming parsers keep state)."""
        return ToolCallParser(self.parser_class(self.tokenizer, self.vllm_tools), self.vllm_request)


class ToolCalling:
    """Server-wide: which vLLM tool parser reads this model's calls."""

    def __init__(self, tokenizer: Any, parser_name: str) -> None:
        # Loaded now rather than on the first request with tools (they pull in xgrammar).
        import vllm.entrypoints.openai.chat_completion.protocol  # noqa: F401
        import vllm.tool_parsers.structural_tag_registry  # noqa: F401
        from vllm.tool_parsers import ToolParserManager

        self.parser_name = parser_name
        try:
            self.parser_class = ToolParserManager.get_tool_parser(parser_name)
        except KeyError as exc:
            raise ValueError(f"vLLM has no tool parser named {parser_name!r}") from exc
        self.tokenizer = tokenizer

    def plan(self, request: ChatCompletionRequest) -> ToolPlan | None:
        """Validate ``tools``/``tool_choice``/``parallel_tool_calls`` and decide how the
        request uses them; None without tools."""
        choice = request.tool_choice
        if request.tools is not None and not request.tools:
            raise BadRequest("tools must not be an empty list", param="tools")
        if not request.tools:
            if choice not in (None, "none"):
                raise BadRequest("tool_choice needs tools", param="tool_choice")
            return None
        names = [tool.function.name for tool in request.tools]
        if len(set(names)) != len(names):
            raise BadRequest("tool names must be unique", param="tools")
        for index, tool in enumerate(request.tools):
            if tool.function.parameters is not None:
                check_json_schema(tool.function.parameters, f"tools.{index}.function.parameters")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise BadRequest(
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                param="tool_choice",
            )
        if choice == "none":
            # Not even shown: the answer is text, as OpenAI guarantees for "none".
            return ToolPlan(template_tools=None, structural_tag=None, parse=False)
        choice = choice or "auto"
        forced = choice != "auto"
        if (
            forced
            and request.response_format is not None
            and request.response_format.type != "text"
        ):
            raise BadRequest(
                "response_format cannot be combined with a tool_choice that forces a call",
                param="response_format",
            )

        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as VLLMChatRequest,
        )

        wire_tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
        # vLLM's parser and structural tags take vLLM's request model; it carries only the
        # tool fields here (the messages are rendered by DvD).
        named = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
        try:
            vllm_request = VLLMChatRequest.model_validate(
                {
                    "messages": [],
                    "tools": wire_tools,
                    "tool_choice": named,
                    "parallel_tool_calls": request.parallel_tool_calls is not False,
                }
            )
            vllm_tools = list(vllm_request.tools or [])
            structural_tag = self._structural_tag(
                vllm_tools,
                vllm_request.tool_choice,
                forced,
                request.parallel_tool_calls is False,
            )
        except BadRequest:
            raise
        except Exception as exc:  # vLLM refused the tools as given
            raise BadRequest(f"invalid tools: {exc}", param="tools") from exc
        return ToolPlan(
            template_tools=wire_tools,
            structural_tag=structural_tag,
            parse=True,
            parser_class=self.parser_class,
            tokenizer=self.tokenizer,
            vllm_tools=vllm_tools,
            vllm_request=vllm_request,
        )

    def _structural_tag(
        self, tools: list[Any], choice: Any, forced: bool, single_call: bool
    ) -> str | None:
        from vllm.tool_parsers.structural_tag_registry import (
            get_model_structural_tag,
            limit_to_single_tool_call,
        )
        from vllm.tool_parsers.tool_strict_level import ToolStrictLevel

        model = self.parser_class.structural_tag_model
        if model is None:
            if forced or single_call:
                raise BadRequest(
                    f"the {self.parser_name!r} tool parser cannot enforce this tool_choice "
                    "or parallel_tool_calls=false",
                    param="tool_choice",
                )
            return None
        # A forced call follows the function's parameter schema; with "auto", only tools
        # marked strict are held to theirs (and the envelope, to allow a single call).
        level = ToolStrictLevel.PARAMETER if forced else ToolStrictLevel.AUTO
        if single_call:
            level = max(level, ToolStrictLevel.FUNCTION)
        tag = get_model_structural_tag(model, tools, choice, reasoning=False, strict_level=level)
        if tag is None:
            return None
        if single_call:
            limit_to_single_tool_call(tag)
        return json.dumps(tag.model_dump())


def _tool_call(vllm_call: Any) -> ToolCall:
    return ToolCall(
        id=vllm_call.id,
        function=FunctionCall(name=vllm_call.function.name, arguments=vllm_call.function.arguments),
    )


class ToolCallParser:
    """vLLM's tool parser for one choice: whole answers and stream deltas."""

    def __init__(self, parser: Any, vllm_request: Any) -> None:
        self.parser = parser
        self.vllm_request = vllm_request

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer; content is the text before the first call."""
        info = self.parser.extract_tool_calls(text, self.vllm_request)
        if not info.tools_called:
            return text, []
        return info.content, [_tool_call(call) for call in info.tool_calls]

    def delta(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> tuple[str | None, list[ToolCallDelta]]:
        """(content, call pieces) that the latest tokens complete; text that may still turn
        out to start a call is held back."""
        message = self.parser.extract_tool_calls_streaming(
            previous_text,
            current_text,
            delta_text,
            previous_token_ids,
            current_token_ids,
            delta_token_ids,
            self.vllm_request,
        )
        if message is None:
            return None, []
        return message.content, tool_call_deltas(message.tool_calls)

    def unstreamed_arguments(self) -> str:
        """Arguments the parser read but has not streamed yet (flushed at the end)."""
        return str(self.parser.get_remaining_unstreamed_args())


def tool_call_deltas(vllm_calls: Sequence[Any]) -> list[ToolCallDelta]:
    """vLLM's streamed tool-call pieces in our protocol's shape."""
    calls = []
    for vllm_call in vllm_calls:
        call = ToolCallDelta.model_validate(vllm_call.model_dump(exclude_none=True))
        if call.id is not None and call.function is not None:
            # OpenAI's first piece of a call carries its arguments as "" (clients append).
            call.function.arguments = call.function.arguments or ""
        calls.append(call)
    return calls

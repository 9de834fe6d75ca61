"""The bounds on what one request may ask for, checked before any work is spent on it.

Every field whose size drives the cost of a request (prompt rendering and tokenizing, schema
checks and grammar compilation, sampling, image tiling) has a limit here, from the settings;
a request over one is refused with a 400 whose ``param`` names the field, before any image or
video is fetched or decoded. The lists were already capped while the body was parsed
(``protocol.py``); these are the service's own, tighter, limits.
"""

from __future__ import annotations

import json
from typing import Any

from llm_server.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    JSONSchemaFormat,
    TextPart,
)
from llm_server.errors import BadRequest
from llm_server.settings import LLMSettings
from protos.messages import over_limit


def check_request_limits(
    request: ChatCompletionRequest, settings: LLMSettings, max_tiles_limit: int
) -> None:
    """400 (``param``: the field) unless every size of ``request`` is within the limits.
    ``max_tiles_limit``: the largest per-image ``max_tiles`` the image encoder accepts."""
    _check_messages(request.messages, settings)
    _check_sampling(request, settings)
    _check_visual_options(request, settings, max_tiles_limit)
    _check_tools(request, settings)
    _check_schemas(request, settings)
    chars = request_text_chars(request)
    if chars > settings.max_text_chars:
        raise BadRequest(
            f"the request holds {chars} characters of text; the limit is {settings.max_text_chars}",
            param="messages",
        )


def _over(what: str, count: int, limit: int, param: str) -> BadRequest:
    return BadRequest(f"{count} {what} in one request; the limit is {limit}", param=param)


def _check_messages(messages: list[ChatMessage], settings: LLMSettings) -> None:
    if len(messages) > settings.max_messages:
        raise _over("messages", len(messages), settings.max_messages, "messages")
    limit = settings.max_content_parts
    for index, message in enumerate(messages):
        parts = len(message.content) if isinstance(message.content, list) else 0
        calls = len(message.tool_calls or [])
        if max(parts, calls) > limit:
            what = "content parts" if parts > limit else "tool calls"
            raise BadRequest(
                f"message {index} has {max(parts, calls)} {what}; the limit is {limit}",
                param="messages",
            )


def _check_sampling(request: ChatCompletionRequest, settings: LLMSettings) -> None:
    if request.n > settings.max_n:
        raise BadRequest(
            f"n={request.n} exceeds this server's limit of {settings.max_n}", param="n"
        )
    stops = request.stop_sequences
    if len(stops) > settings.max_stop_sequences:
        raise _over("stop sequences", len(stops), settings.max_stop_sequences, "stop")
    longest = max((len(stop) for stop in stops), default=0)
    if longest > settings.max_stop_chars:
        raise BadRequest(
            f"a stop sequence of {longest} characters; the limit is {settings.max_stop_chars}",
            param="stop",
        )
    entries = len(request.logit_bias or {})
    if entries > settings.max_logit_bias:
        raise _over("logit_bias entries", entries, settings.max_logit_bias, "logit_bias")
    if request.top_logprobs is not None and request.top_logprobs > settings.max_top_logprobs:
        raise BadRequest(
            f"top_logprobs={request.top_logprobs} exceeds this server's limit of "
            f"{settings.max_top_logprobs}",
            param="top_logprobs",
        )


def _check_visual_options(
    request: ChatCompletionRequest, settings: LLMSettings, max_tiles_limit: int
) -> None:
    if request.max_tiles is not None and request.max_tiles > max_tiles_limit:
        message = over_limit("max_tiles", request.max_tiles, max_tiles_limit, "tiles per image")
        raise BadRequest(message, param="max_tiles")
    # Checked with or without a video: a bound is a bound, whatever else the request holds.
    if request.num_frames is not None and request.num_frames > settings.max_num_frames:
        message = over_limit(
            "num_frames", request.num_frames, settings.max_num_frames, "frames per video"
        )
        raise BadRequest(message, param="num_frames")


def _check_tools(request: ChatCompletionRequest, settings: LLMSettings) -> None:
    tools = len(request.tools or [])
    if tools > settings.max_tools:
        raise _over("tools", tools, settings.max_tools, "tools")


def _check_schemas(request: ChatCompletionRequest, settings: LLMSettings) -> None:
    """The schemas' JSON size, counted up to the limit: a schema far over it costs no more to
    measure than one at it."""
    budget = settings.max_schema_chars
    for tool in request.tools or []:
        if tool.function.parameters is not None:
            budget = _spend(budget, tool.function.parameters, "tools", settings)
    if isinstance(request.response_format, JSONSchemaFormat):
        schema = request.response_format.json_schema.json_schema
        _spend(budget, schema, "response_format", settings)


def _spend(budget: int, schema: dict[str, Any], param: str, settings: LLMSettings) -> int:
    left = budget - json_size(schema, budget + 1)
    if left < 0:
        raise BadRequest(
            f"the request's schemas (tools' parameters, response_format) exceed "
            f"{settings.max_schema_chars} characters of JSON",
            param=param,
        )
    return left


def json_size(value: Any, stop_after: int) -> int:
    """Characters of ``value`` as compact JSON, escapes aside, counted no further than
    ``stop_after`` (past it, some number above it). Iterative: deep nesting costs no stack;
    and the count stops as soon as it passes, so a huge schema costs no more than one at the
    limit (a list is only walked once its commas fit)."""
    size = 0
    pending = [value]
    while pending and size <= stop_after:
        item = pending.pop()
        if isinstance(item, dict):
            size += 1 + 2 * len(item) if item else 2  # braces, colons and commas
            for key, inner in item.items():
                if size > stop_after:
                    break
                size += len(str(key)) + 2
                pending.append(inner)
        elif isinstance(item, list):
            size += 1 + len(item) if item else 2  # brackets and commas
            if size <= stop_after:
                pending.extend(item)
        elif isinstance(item, str):
            size += len(item) + 2
        else:  # a number, true, false or null
            size += len(json.dumps(item))
    return size


def request_text_chars(request: ChatCompletionRequest) -> int:
    """Characters of text the prompt is rendered from: the messages' text, names and tool
    calls, and the tools' descriptions (their parameters count as schemas)."""
    chars = 0
    for message in request.messages:
        chars += len(message.name or "") + len(message.tool_call_id or "")
        if isinstance(message.content, str):
            chars += len(message.content)
        elif message.content is not None:
            chars += sum(len(part.text) for part in message.content if isinstance(part, TextPart))
        for call in message.tool_calls or []:
            chars += len(call.id) + len(call.function.name) + len(call.function.arguments)
    for tool in request.tools or []:
        chars += len(tool.function.description or "")
    return chars

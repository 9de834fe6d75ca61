"""Responses (``/v1/responses``): OpenAI's newer API on the chat path.

A request becomes the chat request it means: ``instructions`` a system message, the stored
conversation of ``previous_response_id`` (if any), then the input items as messages
(``input_image`` parts as ``image_url`` parts, ``function_call`` items as an assistant's
tool calls, ``function_call_output`` items as tool messages), ``text.format`` as
``response_format``, the function tools as chat tools. ``ChatService`` then does everything
it does for chat: limits, admission, images through the vision service, the chat template,
structured outputs, tool parsing, vLLM. Its answer becomes output items: the reasoning (GPT-OSS),
the message, and one ``function_call`` per call.

A stream is OpenAI's event sequence (``response.created``, ``response.in_progress``, per
output item ``response.output_item.added``, its deltas, ``response.output_item.done``, then
``response.completed``; ``response.failed`` when generation fails). As ``vllm serve`` does, a
response cut short by ``max_output_tokens`` ends with ``response.completed`` too, its
``status`` ``incomplete``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from llm_server.api.choices import ChoiceOutput
from llm_server.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    ImagePart,
    ImageURL,
    JSONObjectFormat,
    JSONSchemaFormat,
    JSONSchemaSpec,
    NamedFunction,
    NamedToolChoice,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolDefinition,
)
from llm_server.api.response_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    FunctionToolCall,
    IncompleteDetails,
    InputImage,
    InputItem,
    InputTokensDetails,
    ItemStatus,
    MessageItem,
    NamedFunctionChoice,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ReasoningOutput,
    ReasoningText,
    RefusalPart,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)
from llm_server.api.response_store import ResponseStore, conversation_size
from llm_server.api.serving import ChatService, PreparedChat
from llm_server.errors import APIError, BadRequest, ResponseNotFound

logger = logging.getLogger(__name__)

# The chat request's fields, as a Responses client knows them (for errors' ``param``).
RESPONSES_PARAMS = {
    "messages": "input",
    "response_format": "text.format",
    "max_tokens": "max_output_tokens",
}


@dataclass
class PreparedResponse:
    chat: PreparedChat
    request: ResponsesRequest
    conversation: list[ChatMessage]  # history and input, without the instructions
    response: ResponseObject  # the response's fields known before generating (in_progress)


def _as_responses_error(error: APIError) -> APIError:
    if error.param in RESPONSES_PARAMS:
        error.param = RESPONSES_PARAMS[error.param]
    return error


def _message(**fields: Any) -> ChatMessage:
    # Validated as a parsed message is (roles, images in user messages only, ...).
    return ChatMessage.model_validate(fields)


def _parts(content: list[Any], role: str) -> list[ContentPart] | str:
    """A message item's parts as chat content parts (an assistant's as its text)."""
    if role != "user":
        texts = []
        for part in content:
            if isinstance(part, InputImage):
                raise BadRequest(
                    f"images are only accepted in user messages, not {role}", param="input"
                )
            texts.append(part.refusal if isinstance(part, RefusalPart) else part.text)
        return "".join(texts)
    parts: list[ContentPart] = []
    for part in content:
        if isinstance(part, InputImage):
            if part.file_id is not None or part.image_url is None:
                raise BadRequest(
                    "input_image needs an image_url (a data: URL or an allowed http(s) URL); "
                    "file_id is not supported",
                    param="input",
                )
            detail = "high" if part.detail == "original" else part.detail
            parts.append(
                ImagePart(
                    type="image_url",
                    image_url=ImageURL(
                        url=part.image_url,
                        detail=detail,
                        max_visual_tokens=part.max_visual_tokens,
                    ),
                )
            )
        elif isinstance(part, RefusalPart):
            parts.append(TextPart(type="text", text=part.refusal))
        else:
            parts.append(TextPart(type="text", text=part.text))
    return parts


def input_messages(items: list[InputItem]) -> list[ChatMessage]:
    """Input items as chat messages: consecutive function calls (and the assistant text
    before them) become one assistant message with ``tool_calls``."""
    messages: list[ChatMessage] = []
    for item in items:
        if isinstance(item, MessageItem):
            content = item.content
            parts = _parts(content, item.role) if isinstance(content, list) else content
            messages.append(_message(role=item.role, content=parts))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(
                id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments)
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(_message(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output
            if not isinstance(output, str):
                output = "".join(part.text for part in output)
            messages.append(_message(role="tool", content=output, tool_call_id=item.call_id))
        # reasoning items: left out of the prompt
    return messages


def _tool_choice(choice: str | NamedFunctionChoice | None) -> ToolChoice | None:
    if choice is None or isinstance(choice, str):
        return choice  # type: ignore[return-value]
    if choice.type != "function" or not choice.name:
        raise BadRequest(
            f"tool_choice of type {choice.type!r} is not supported (function tools only)",
            param="tool_choice",
        )
    return NamedToolChoice(type="function", function=NamedFunction(name=choice.name))


def _tools(tools: list[Any] | None) -> list[ToolDefinition] | None:
    if tools is None:
        return None
    out = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, FunctionTool):
            raise BadRequest(
                f"tools[{index}] is a {tool.type!r} tool; this server runs function tools only",
                param="tools",
            )
        out.append(
            ToolDefinition(
                type="function",
                function=FunctionDefinition(
                    name=tool.name,
                    description=tool.description,
                    parameters=tool.parameters,
                    strict=tool.strict,
                ),
            )
        )
    return out


def _response_format(request: ResponsesRequest) -> Any:
    format_ = request.text.format if request.text is not None else None
    if isinstance(format_, TextFormatJSONObject):
        return JSONObjectFormat(type="json_object")
    if isinstance(format_, TextFormatJSONSchema):
        spec = JSONSchemaSpec(
            name=format_.name,
            description=format_.description,
            schema=format_.json_schema,
            strict=format_.strict,
        )
        return JSONSchemaFormat(type="json_schema", json_schema=spec)
    return None


def _output_items(
    content: str | None, reasoning: str | None, calls: list[ToolCall], status: ItemStatus
) -> list[Any]:
    items: list[Any] = []
    if reasoning:
        items.append(ReasoningOutput(content=[ReasoningText(text=reasoning)], status=status))
    if content or not calls:
        items.append(OutputMessage(content=[OutputText(text=content or "")], status=status))
    items.extend(
        FunctionToolCall(
            call_id=call.id, name=call.function.name, arguments=call.function.arguments
        )
        for call in calls
    )
    return items


def answer_message(output: list[Any]) -> ChatMessage | None:
    """A response's output as the assistant message a continuation's history holds."""
    text = "".join(
        part.text for item in output if isinstance(item, OutputMessage) for part in item.content
    )
    calls = [
        ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
        for item in output
        if isinstance(item, FunctionToolCall)
    ]
    if not text and not calls:
        return _message(role="assistant", content="")
    return _message(role="assistant", content=text or None, tool_calls=calls or None)


class ResponsesService:
    """The logic behind ``/v1/responses`` (no HTTP objects here), on the chat service."""

    def __init__(self, chat: ChatService, store: ResponseStore) -> None:
        self.chat = chat
        self.store = store
        self.settings = chat.settings
        self.admission = chat.admission

    # ---- preparation ---------------------------------------------------------------------

    def _check_sizes(self, request: ResponsesRequest) -> None:
        """The counts the conversion to messages costs, bounded before it (the rest of the
        limits are chat's, checked on the whole conversation)."""
        settings = self.settings
        items = request.input if isinstance(request.input, list) else []
        if len(items) > settings.max_messages:
            raise BadRequest(
                f"{len(items)} input items in one request; the limit is {settings.max_messages}",
                param="input",
            )
        for index, item in enumerate(items):
            content = getattr(item, "content", None) or getattr(item, "output", None)
            if isinstance(content, list) and len(content) > settings.max_content_parts:
                raise BadRequest(
                    f"input item {index} has {len(content)} content parts; the limit is "
                    f"{settings.max_content_parts}",
                    param="input",
                )
        if request.tools is not None and len(request.tools) > settings.max_tools:
            raise BadRequest(
                f"{len(request.tools)} tools in one request; the limit is {settings.max_tools}",
                param="tools",
            )

    def history(self, request: ResponsesRequest) -> list[ChatMessage]:
        """The stored conversation ``previous_response_id`` continues (none without one); a
        404 when it is unknown, expired or evicted. On the event loop: the store is not
        shared with threads."""
        if request.previous_response_id is None:
            return []
        stored = self.store.get(request.previous_response_id)
        if stored is None:
            raise ResponseNotFound(
                f"Previous response with id {request.previous_response_id!r} not found "
                "(never stored, expired or evicted).",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return stored.conversation

    def to_chat(
        self, request: ResponsesRequest, history: list[ChatMessage]
    ) -> tuple[ChatCompletionRequest, list[ChatMessage]]:
        """The chat request ``request`` means after ``history``, and its conversation (to
        store). Costs what the input's items and parts make it cost: off the event loop."""
        try:
            if isinstance(request.input, str):
                new_messages = [_message(role="user", content=request.input)]
            else:
                new_messages = input_messages(request.input)
            conversation = [*history, *new_messages]
            instructions = (
                [_message(role="system", content=request.instructions)]
                if request.instructions is not None
                else []
            )
            if not conversation:
                raise BadRequest("the input holds no message", param="input")
            chat_request = ChatCompletionRequest.model_validate(
                {
                    "model": request.model,
                    "messages": [*instructions, *conversation],
                    "temperature": request.temperature,
                    "top_p": request.top_p,
                    "max_completion_tokens": request.max_output_tokens,
                    "response_format": _response_format(request),
                    "tools": _tools(request.tools),
                    "tool_choice": _tool_choice(request.tool_choice),
                    "parallel_tool_calls": request.parallel_tool_calls,
                    "user": request.user,
                    "seed": request.seed,
                    "vir": request.vir,
                    "vir_threshold": request.vir_threshold,
                    "max_tiles": request.max_tiles,
                    "max_visual_tokens": request.max_visual_tokens,
                    "top_k": request.top_k,
                    "min_tokens": request.min_tokens,
                }
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                if error["loc"]
                else error["msg"]
                for error in exc.errors()[:5]
            )
            raise BadRequest(f"invalid input: {problems}", param="input") from None
        return chat_request, conversation

    async def prepare(self, request: ResponsesRequest, response_id: str) -> PreparedResponse:
        """Everything the chat path prepares (images encoded, prompt built), for a response.
        Run inside an ``admission.slot()`` that also covers ``create``/``stream``."""
        try:
            feature = request.unsupported_feature()
            if feature:
                raise BadRequest(f"{feature} is not supported by this server", param=feature)
            self._check_sizes(request)  # the counts, before converting
            history = self.history(request)
            chat_request, conversation = await asyncio.to_thread(self.to_chat, request, history)
            chat = await self.chat.prepare(chat_request, response_id)
        except APIError as exc:
            raise _as_responses_error(exc) from None
        format_ = request.text.format if request.text is not None else None
        response = ResponseObject(
            id=response_id,
            created_at=chat.created,
            model=self.chat.model_name,
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            previous_response_id=request.previous_response_id,
            temperature=request.temperature,
            top_p=request.top_p,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            tool_choice=(
                request.tool_choice.model_dump(exclude_none=True)
                if isinstance(request.tool_choice, NamedFunctionChoice)
                else request.tool_choice or "auto"
            ),
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools or []],
            text={"format": format_.model_dump(by_alias=True) if format_ else {"type": "text"}},
            store=request.store,
            metadata=request.metadata or {},
            user=request.user,
            vision=chat.vision,
        )
        return PreparedResponse(chat, request, conversation, response)

    # ---- answers ---------------------------------------------------------------------------

    def _usage(self, chat: PreparedChat, output_tokens: int) -> ResponseUsage:
        return ResponseUsage(
            input_tokens=chat.num_prompt_tokens,
            input_tokens_details=InputTokensDetails(
                cached_tokens=chat.cached_tokens, image_tokens=chat.num_image_tokens
            ),
            output_tokens=output_tokens,
            output_tokens_details=OutputTokensDetails(),
            total_tokens=chat.num_prompt_tokens + output_tokens,
        )

    async def _finish(
        self, prepared: PreparedResponse, output: list[Any], finish_reason: str | None, tokens: int
    ) -> ResponseObject:
        """The completed response; stored when asked."""
        response = prepared.response.model_copy()
        response.output = output
        response.usage = self._usage(prepared.chat, tokens)
        if finish_reason == "length":
            response.status = "incomplete"
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        else:
            response.status = "completed"
        if prepared.request.store and self.store.max_bytes > 0:
            answer = answer_message(output)
            conversation = [*prepared.conversation, *([answer] if answer else [])]
            size = await asyncio.to_thread(conversation_size, conversation, response)
            if not self.store.put(response, conversation, size):
                logger.warning(
                    "response %s (%d bytes) exceeds the response store; not stored",
                    response.id,
                    size,
                )
        return response

    async def create(self, prepared: PreparedResponse) -> ResponseObject:
        """The whole response (``stream: false``)."""
        completion = await self.chat.complete(prepared.chat)
        choice = completion.choices[0]
        message = choice.message
        status: ItemStatus = "incomplete" if choice.finish_reason == "length" else "completed"
        output = _output_items(message.content, message.reasoning, message.tool_calls or [], status)
        return await self._finish(
            prepared, output, choice.finish_reason, completion.usage.completion_tokens
        )

    def retrieve(self, response_id: str) -> ResponseObject:
        stored = self.store.get(response_id)
        if stored is None:
            raise ResponseNotFound(
                f"Response with id {response_id!r} not found.", param="response_id"
            )
        return stored.response

    def delete(self, response_id: str) -> dict[str, Any]:
        if not self.store.delete(response_id):
            raise ResponseNotFound(
                f"Response with id {response_id!r} not found.", param="response_id"
            )
        return {"id": response_id, "object": "response", "deleted": True}

    async def stream(self, prepared: PreparedResponse) -> AsyncGenerator[str, None]:
        """OpenAI's server-sent events for one response."""
        events = ResponseEvents(prepared.response)
        yield events.lifecycle("response.created")
        yield events.lifecycle("response.in_progress")
        choice = ChoiceOutput(0, prepared.chat.output, streaming=True)
        try:
            async with contextlib.aclosing(self.chat.generate(prepared.chat)) as outputs:
                async for output in outputs:
                    for completion in output.outputs:
                        piece = choice.add(completion)
                        if piece is None:
                            continue
                        delta = piece.delta
                        for event in events.delta(delta.reasoning, delta.content, delta.tool_calls):
                            yield event
            status: ItemStatus = (
                "incomplete" if choice.vllm_finish_reason == "length" else "completed"
            )
            if not events.items and events.open_item is None:  # an empty answer: one message
                for event in events.delta(None, None, None, start_message=True):
                    yield event
            for event in events.close(status):
                yield event
            response = await self._finish(
                prepared, events.items, choice.vllm_finish_reason, len(choice.token_ids)
            )
            yield events.emit("response.completed", response=response.wire())
        except asyncio.CancelledError:
            logger.info("response %s: client went away; generation aborted", prepared.response.id)
            raise
        except Exception as exc:
            logger.exception("response %s failed while streaming", prepared.response.id)
            error = exc if isinstance(exc, APIError) else APIError("generation failed")
            failed = prepared.response.model_copy()
            failed.status = "failed"
            failed.output = events.items
            failed.error = ResponseError(code=error.code or error.error_type, message=error.message)
            yield events.emit("response.failed", response=failed.wire())


class ResponseEvents:
    """The event sequence of one streamed response: output items opened and closed as the
    answer moves from reasoning to text to calls, every event numbered."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.sequence = 0
        self.items: list[Any] = []  # finished output items
        self._open: Any = None  # the output item being streamed
        self._text = ""  # its text (message, reasoning) so far

    def emit(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n"

    def lifecycle(self, kind: str) -> str:
        return self.emit(kind, response=self.response.wire())

    @property
    def open_item(self) -> Any:
        return self._open

    @property
    def _index(self) -> int:
        return len(self.items)

    def delta(
        self,
        reasoning: str | None,
        content: str | None,
        calls: list[ToolCallDelta] | None,
        start_message: bool = False,
    ) -> list[str]:
        """The events of one increment of the answer (``start_message``: open an empty
        message item)."""
        out: list[str] = []
        if reasoning:
            if not isinstance(self._open, ReasoningOutput):
                out += self.close("completed")
                out += self._start(ReasoningOutput(status="in_progress"))
            self._text += reasoning
            out.append(self._text_event("response.reasoning_text.delta", delta=reasoning))
        if (content or start_message) and not isinstance(self._open, OutputMessage):
            out += self.close("completed")
            out += self._start(OutputMessage(status="in_progress"))
        if content:
            self._text += content
            out.append(self._text_event("response.output_text.delta", delta=content, logprobs=[]))
        for call in calls or []:
            if call.id is not None:  # a new call begins
                out += self.close("completed")
                name = call.function.name if call.function and call.function.name else ""
                out += self._start(
                    FunctionToolCall(call_id=call.id, name=name, arguments="", status="in_progress")
                )
            arguments = call.function.arguments if call.function else None
            if arguments and isinstance(self._open, FunctionToolCall):
                self._open.arguments += arguments
                out.append(
                    self.emit(
                        "response.function_call_arguments.delta",
                        item_id=self._open.id,
                        output_index=self._index,
                        delta=arguments,
                    )
                )
        return out

    def _text_event(self, kind: str, **fields: Any) -> str:
        return self.emit(
            kind, item_id=self._open.id, output_index=self._index, content_index=0, **fields
        )

    def _start(self, item: Any) -> list[str]:
        self._open, self._text = item, ""
        out = [
            self.emit(
                "response.output_item.added", output_index=self._index, item=item.model_dump()
            )
        ]
        if isinstance(item, OutputMessage):
            part = OutputText(text="").model_dump()
            out.append(
                self.emit(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=self._index,
                    content_index=0,
                    part=part,
                )
            )
        return out

    def close(self, status: ItemStatus) -> list[str]:
        """Finish the open item (if any)."""
        item, self._open = self._open, None
        if item is None:
            return []
        out: list[str] = []
        index = self._index
        if isinstance(item, OutputMessage):
            part = OutputText(text=self._text)
            item.content = [part]
            out.append(
                self.emit(
                    "response.output_text.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=self._text,
                    logprobs=[],
                )
            )
            out.append(
                self.emit(
                    "response.content_part.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=part.model_dump(),
                )
            )
        elif isinstance(item, ReasoningOutput):
            item.content = [ReasoningText(text=self._text)]
            out.append(
                self.emit(
                    "response.reasoning_text.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=self._text,
                )
            )
        else:
            out.append(
                self.emit(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        item.status = status
        out.append(
            self.emit("response.output_item.done", output_index=index, item=item.model_dump())
        )
        self.items.append(item)
        return out

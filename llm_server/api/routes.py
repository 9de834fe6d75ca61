"""HTTP routes (thin): parse, call ``ChatService``, shape the response. No prompt logic here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from functools import partial
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from llm_server import tracing
from llm_server.api.completion_protocol import CompletionRequest, text_completion_id
from llm_server.api.completions import CompletionService
from llm_server.api.protocol import ChatCompletionRequest, ModelList, completion_id
from llm_server.api.response_protocol import ResponsesRequest, response_id
from llm_server.api.responses import ResponsesService
from llm_server.api.serving import ChatService
from llm_server.api.tokenization import TokenizationService
from llm_server.api.tokenize_protocol import (
    DetokenizeRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
)
from llm_server.errors import APIError, EngineUnavailable, Unauthorized

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")  # a route's prepared request


# The dependencies are ``async def`` although they never wait: FastAPI runs a plain ``def``
# dependency on AnyIO's worker threads, a thread hop per request, and those threads come and go.
async def require_api_key(request: Request) -> None:
    """With ``--api-key``, /v1/* needs ``Authorization: Bearer <key>`` (constant-time check)."""
    expected = getattr(request.app.state, "api_key", None)
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("missing or invalid API key (send 'Authorization: Bearer <key>')")


# Bodies from this size on are parsed on a worker thread. Parsing is C code that holds the GIL
# either way, but on a thread it is not one more piece of an event-loop step that already
# read, joined and counted the body: a 30 MB body took one 0.24 s step parsed on the loop.
THREADED_JSON_BYTES = 1 << 20


def parse_json(body: bytes) -> Any:
    """``json.loads``, with nesting past the interpreter's recursion limit reported as the
    malformed JSON it is (a 400), not as a RecursionError (a 500)."""
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise json.JSONDecodeError("JSON nested too deeply", "", 0) from exc


class JSONOffLoopRequest(Request):
    """A request whose large JSON body is parsed on a worker thread."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) < THREADED_JSON_BYTES:
                self._json = parse_json(body)
            else:
                self._json = await asyncio.to_thread(parse_json, body)
        return self._json


class JSONOffLoopRoute(APIRoute):
    """FastAPI's route, handing its handler a ``JSONOffLoopRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(JSONOffLoopRequest(request.scope, request.receive))

        return handle


# /v1/*: the OpenAI API, behind the API key when there is one. /health, /metrics: operations.
router = APIRouter(dependencies=[Depends(require_api_key)], route_class=JSONOffLoopRoute)
ops_router = APIRouter()


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


async def get_chat(request: Request) -> ChatService:
    chat = getattr(request.app.state, "chat", None)
    if chat is None:
        raise EngineUnavailable("the language engine is not running")
    return chat


ChatDependency = Annotated[ChatService, Depends(get_chat)]


async def get_completions(request: Request) -> CompletionService:
    completions = getattr(request.app.state, "completions", None)
    if completions is None:
        raise EngineUnavailable("the language engine is not running")
    return completions


async def get_responses(request: Request) -> ResponsesService:
    responses = getattr(request.app.state, "responses", None)
    if responses is None:
        raise EngineUnavailable("the language engine is not running")
    return responses


CompletionsDependency = Annotated[CompletionService, Depends(get_completions)]
ResponsesDependency = Annotated[ResponsesService, Depends(get_responses)]


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it (aborting vLLM and gRPC calls) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # Let the work unwind (vLLM request aborted, gRPC call cancelled) before the caller's
    # scope ends, so that the request's slot is released after its work, not before.
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # the client is gone: nobody else reads how the work ended
    raise ClientDisconnected()


class ScopedStreamingResponse(StreamingResponse):
    """A stream that owns its request's scope (the admission slot): when the response ends,
    however it ends (finished, failed, the client gone before or during it), the event
    generator is closed and the scope exited, exactly once, without waiting for the garbage
    collector."""

    def __init__(
        self,
        events: AsyncGenerator[str, None],
        request_scope: contextlib.AsyncExitStack,
        **kwargs: Any,
    ) -> None:
        super().__init__(events, **kwargs)
        self._events = events
        self._request_scope = request_scope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._request_scope, contextlib.aclosing(self._events):
            await super().__call__(scope, receive, send)


class WireAnswer(Protocol):
    def wire(self) -> dict[str, Any]: ...


async def generate(
    request: Request,
    slot: contextlib.AbstractAsyncContextManager[Any],
    request_id: str,
    prepare: Callable[[], Awaitable[P]],
    stream: Callable[[P], AsyncGenerator[str, None]] | None,
    complete: Callable[[P], Awaitable[WireAnswer]],
) -> Response:
    """What every generating route does: take a slot first (an overloaded server refuses
    before fetching or decoding any image), prepare the request, then answer it whole
    (``stream`` None) or as a stream that takes the slot over, since it outlives this call.
    The work is cancelled if the client disconnects."""
    tracing.stage_since_arrival("body")  # FastAPI read, parsed and validated it
    headers = {"X-Request-Id": request_id}
    async with contextlib.AsyncExitStack() as request_scope:
        await request_scope.enter_async_context(slot)
        prepared = await until_disconnected(request, prepare())
        if stream is not None:
            return ScopedStreamingResponse(
                stream(prepared),
                request_scope.pop_all(),
                media_type="text/event-stream",
                headers=headers,
            )
        answer = await until_disconnected(request, complete(prepared))
    return JSONResponse(answer.wire(), headers=headers)


def include_usage(stream_options: Any) -> bool:
    return bool(stream_options and stream_options.include_usage)


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, chat: ChatDependency
) -> Response:
    request_id = completion_id()
    stream = partial(
        chat.stream,
        include_usage=include_usage(body.stream_options),
        return_token_ids=body.return_token_ids,
    )
    return await generate(
        request,
        chat.admission.slot(),
        request_id,
        prepare=lambda: chat.prepare(body, request_id),
        stream=stream if body.stream else None,
        complete=partial(chat.complete, return_token_ids=body.return_token_ids),
    )


@router.post("/v1/completions")
async def create_completion(
    body: CompletionRequest, request: Request, completions: CompletionsDependency
) -> Response:
    request_id = text_completion_id()
    stream = partial(completions.stream, include_usage=include_usage(body.stream_options))
    return await generate(
        request,
        completions.admission.slot(),
        request_id,
        prepare=lambda: completions.prepare(body, request_id),
        stream=stream if body.stream else None,
        complete=completions.complete,
    )


@router.post("/v1/responses")
async def create_response(
    body: ResponsesRequest, request: Request, responses: ResponsesDependency
) -> Response:
    request_id = response_id()
    return await generate(
        request,
        responses.admission.slot(),
        request_id,
        prepare=lambda: responses.prepare(body, request_id),
        stream=responses.stream if body.stream else None,
        complete=responses.create,
    )


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, responses: ResponsesDependency) -> JSONResponse:
    return JSONResponse(responses.retrieve(response_id).wire())


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, responses: ResponsesDependency) -> JSONResponse:
    return JSONResponse(responses.delete(response_id))


@router.get("/v1/models")
async def list_models(chat: ChatDependency) -> ModelList:
    return chat.models()


# /tokenize and /detokenize: vLLM's paths and shapes, behind the API key like /v1 (a chat's
# images are encoded to be counted).
async def get_tokenization(chat: ChatDependency) -> TokenizationService:
    return TokenizationService(chat)


TokenizationDependency = Annotated[TokenizationService, Depends(get_tokenization)]


@router.post("/tokenize")
async def tokenize(
    body: TokenizeRequest, request: Request, tokenization: TokenizationDependency
) -> JSONResponse:
    if isinstance(body, TokenizeCompletionRequest):
        response = await tokenization.tokenize_text(body)
        return JSONResponse(response.model_dump())
    async with contextlib.AsyncExitStack() as request_scope:
        if body.has_media:  # encoded like a chat's: a slot first, as a chat takes
            await request_scope.enter_async_context(tokenization.chat.admission.slot())
        work = tokenization.tokenize_chat(body, f"tokenize-{uuid.uuid4().hex}")
        response = await until_disconnected(request, work)
    return JSONResponse(response.model_dump())


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, tokenization: TokenizationDependency) -> JSONResponse:
    response = await tokenization.detokenize(body)
    return JSONResponse(response.model_dump())


@ops_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when the language engine serves; reports the vision service separately, since
    text-only requests do not need it."""
    chat: ChatService | None = getattr(request.app.state, "chat", None)
    if chat is None or chat.engine.errored:
        return JSONResponse({"status": "unavailable", "engine": "down"}, status_code=503)
    vision = "serving" if await chat.encoder.ready() else "unavailable"
    return JSONResponse({"status": "ok", "engine": "serving", "vision": vision})


@ops_router.get("/metrics")
async def metrics() -> Response:
    """Prometheus exposition: vLLM's engine series (``vllm:*``) and DvD's own (``dvd:*``)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())


def _describe_validation_error(error: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    first_param = None
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        path = ".".join(location)
        first_param = first_param or (location[0] if location else None)
        problems.append(f"{path}: {item.get('msg')}" if path else str(item.get("msg")))
    return "; ".join(problems) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error JSON with a meaningful status code."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status_code >= 500:
            logger.warning("%s: %s", type(exc).__name__, exc.message)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation_error(exc)
        error = APIError(message, param=param)
        error.status_code, error.error_type = 400, "invalid_request_error"
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return _error_response(error)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(APIError("internal server error"))

"""Errors across the vision boundary travel as codes: the same condition is the same API error
whichever service catches it, and whichever way the vision service's error arrives (over gRPC,
in its trailing metadata, or typed, in process). A vision service that sends no code still
gets the mapping read from its status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llm_server.api.protocol import ChatCompletionRequest
from llm_server.api.serving import ChatService
from llm_server.engine.backbone import Backbone
from llm_server.errors import APIError, InvalidImage, TooManyItems
from llm_server.settings import LLMSettings
from llm_server.vision.errors import rpc_error
from llm_server.vision.grpc_client import GrpcVisualEncoder
from llm_server.vision.inprocess import InProcessVisualEncoder
from protos import messages
from protos.messages import (
    EncodeCall,
    EncodeOptions,
    ErrorCode,
    ErrorDetail,
    Field,
    ImageInput,
    VideoInput,
)
from vision_server import errors as vision_errors
from vision_server.service import VisionServicer, add_vision_service

MODEL = "dvd-tiny-internvl"
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
VIDEO_PART = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}

# The same limits on both services.
LIMITS = {
    "max_images_per_request": 1,
    "max_videos_per_request": 1,
    "max_num_frames": 4,
    "max_tiles_limit": 12,  # the tiny checkpoint's default
}


@pytest.fixture(scope="module")
def pipeline(tiny_models: dict[str, Path]) -> Iterator[Any]:
    """The real vision pipeline with ``LIMITS``; its checks refuse before any decoding."""
    from vision_server.server import build_pipeline
    from vision_server.settings import VisionSettings

    settings = VisionSettings(  # type: ignore[call-arg]
        model=str(tiny_models["hf"]), shared_memory=False, **LIMITS
    )
    built, _ = build_pipeline(settings)
    yield built
    built.close()


def as_seen(error: APIError) -> tuple[Any, ...]:
    """What an HTTP client sees of an error."""
    return type(error), error.status_code, error.body(), error.headers()


async def over_grpc(pipeline: Any, call: EncodeCall) -> APIError:
    """The API error of ``call`` sent to the real servicer over gRPC."""
    server = grpc.aio.server()
    add_vision_service(VisionServicer(pipeline, MODEL), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    encoder = GrpcVisualEncoder(
        f"127.0.0.1:{port}",
        timeout_s=60,
        expected_hidden_size=pipeline.spec.llm_hidden_size,
        transport="grpc",
    )
    try:
        with pytest.raises(APIError) as caught:
            await encoder.encode(call)
        return caught.value
    finally:
        await encoder.close()
        await server.stop(0)


async def in_process(pipeline: Any, call: EncodeCall) -> APIError:
    """The API error of ``call`` run by the coupled mode's in-process encoder."""
    with pytest.raises(APIError) as caught:
        await InProcessVisualEncoder(pipeline).encode(call)
    return caught.value


# ---- conditions both services check ----------------------------------------------------------


class StandInEngine:
    model_name = MODEL
    vocab_size = 2048
    errored = False
    max_model_len = 4096
    backbone = Backbone(model_type="qwen3", architecture="Qwen3ForCausalLM")


class NoFetch:
    async def load(self, url: str, kind: str = "image") -> bytes:
        raise AssertionError("the request got past its checks")


@pytest.fixture(scope="module")
def chat(tiny_models: dict[str, Path]) -> ChatService:
    from transformers import AutoTokenizer

    from checkpoints.spec import load_checkpoint_spec
    from llm_server.prompt import PromptBuilder

    path = tiny_models["hf"]
    prompts = PromptBuilder(
        AutoTokenizer.from_pretrained(str(path)), load_checkpoint_spec(path).image_tokens
    )
    return ChatService(
        StandInEngine(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # never reached
        prompts,
        NoFetch(),  # type: ignore[arg-type]
        LLMSettings(**LIMITS),  # type: ignore[call-arg]
    )


# (name, the request's content parts and fields, the same call to the vision service)
BOTH_SIDES = [
    (
        "too many images",
        ([IMAGE_PART, IMAGE_PART], {}),
        EncodeCall([ImageInput(b"a"), ImageInput(b"b")]),
    ),
    (
        "too many videos",
        ([VIDEO_PART, VIDEO_PART], {"num_frames": 2}),
        EncodeCall((), [VideoInput(b"a", 2), VideoInput(b"b", 2)]),
    ),
    (
        "num_frames over the limit",
        ([VIDEO_PART], {"num_frames": 5}),
        EncodeCall((), [VideoInput(b"a", 5)]),
    ),
    (
        "max_tiles over the limit",
        ([IMAGE_PART], {"max_tiles": 13}),
        EncodeCall([ImageInput(b"a")], (), EncodeOptions(max_tiles=13)),
    ),
]


@pytest.mark.parametrize(
    ("name", "request_parts", "call"), BOTH_SIDES, ids=[c[0] for c in BOTH_SIDES]
)
def test_same_condition_same_api_error_whichever_service_catches_it(
    chat, pipeline, name, request_parts, call
):
    parts, fields = request_parts
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}], **fields}
    with pytest.raises(APIError) as caught:
        asyncio.run(chat.prepare(ChatCompletionRequest.model_validate(body), "req"))
    language = caught.value
    remote = asyncio.run(over_grpc(pipeline, call))
    coupled = asyncio.run(in_process(pipeline, call))
    assert as_seen(remote) == as_seen(language), name
    assert as_seen(coupled) == as_seen(language), name
    assert language.status_code == 400 and language.param is not None


def test_too_many_images_is_too_many_images_from_either_service(chat, pipeline):
    remote = asyncio.run(over_grpc(pipeline, BOTH_SIDES[0][2]))
    assert isinstance(remote, TooManyItems) and remote.code == "too_many_images"
    assert remote.param == "messages"


# ---- every code: over gRPC and in process -----------------------------------------------------

VISION_ERRORS = [
    vision_errors.InvalidRequest("vir_threshold must be in [0, 1]", field=Field.VIR_THRESHOLD),
    vision_errors.InvalidRequest("vir='max' needs a router", field=Field.VIR_MODE),
    vision_errors.InvalidRequest("request has no images or videos"),
    vision_errors.InvalidImage("image 0: cannot decode image"),
    vision_errors.InvalidImage("image max_tiles=9 is outside [1, 4]", field=Field.IMAGE_MAX_TILES),
    vision_errors.InvalidVideo("video 0: cannot open video"),
    vision_errors.TooManyItems("the images of this request make 90 tiles", field=Field.IMAGES),
    vision_errors.Overloaded("the tile queue is full"),
    vision_errors.ShuttingDown("vision service is shutting down"),
    vision_errors.EncoderOutOfMemory("a pass of 8 tiles ran out of device memory"),
    vision_errors.EncodeFailed("a pass of 8 tiles failed"),
    vision_errors.EngineFailed("the device is unusable"),
    vision_errors.MediaWorkersUnavailable("no media worker runs"),
]


def test_every_vision_error_has_its_own_code():
    codes = {type(error).code for error in VISION_ERRORS}
    assert codes | {ErrorCode.INTERNAL, ErrorCode.UNSPECIFIED} == set(ErrorCode)


@pytest.mark.parametrize("error", VISION_ERRORS, ids=lambda e: f"{type(e).__name__}-{e.field}")
def test_a_vision_error_is_the_same_api_error_over_grpc_and_in_process(
    pipeline, monkeypatch, error
):
    async def refuse(call: EncodeCall) -> AsyncIterator[Any]:
        raise error
        yield

    monkeypatch.setattr(pipeline, "encode", refuse)
    call = EncodeCall([ImageInput(b"a")])
    remote = asyncio.run(over_grpc(pipeline, call))
    coupled = asyncio.run(in_process(pipeline, call))
    assert as_seen(remote) == as_seen(coupled)
    assert str(error) in remote.message


def test_an_unexpected_failure_is_internal_over_grpc(pipeline, monkeypatch):
    async def crash(call: EncodeCall) -> AsyncIterator[Any]:
        raise RuntimeError("a bug")
        yield

    monkeypatch.setattr(pipeline, "encode", crash)
    remote = asyncio.run(over_grpc(pipeline, EncodeCall([ImageInput(b"a")])))
    assert remote.status_code == 500
    assert remote.message == "vision service error: INTERNAL: internal error in the vision service"


# ---- the wire form, and peers without codes ---------------------------------------------------


def rpc(code: grpc.StatusCode, details: str, trailing: tuple[Any, ...] = ()) -> Any:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details
    )


def test_the_error_detail_round_trips_through_trailing_metadata():
    for code in ErrorCode:
        detail = ErrorDetail(code, Field.NUM_FRAMES)
        read = messages.error_from_metadata(messages.error_metadata(detail))
        assert read == (detail if code is not ErrorCode.UNSPECIFIED else None)
    assert messages.error_from_metadata(None) is None
    assert messages.error_from_metadata([(messages.ERROR_METADATA_KEY, b"\xff\xff")]) is None


def test_a_peer_without_codes_gets_the_mapping_of_its_status():
    """An older vision service: no detail, so the status and the message decide, as before
    codes existed (there, a vision-side "too many images" was an invalid image)."""
    old = rpc(grpc.StatusCode.INVALID_ARGUMENT, "3 images in one request; the limit is 2")
    error = rpc_error(old)
    assert isinstance(error, InvalidImage) and error.param == "messages"
    option = rpc_error(rpc(grpc.StatusCode.INVALID_ARGUMENT, "num_frames=9 exceeds it"))
    assert option.param == "num_frames"
    unavailable = rpc_error(rpc(grpc.StatusCode.UNAVAILABLE, ""))
    assert unavailable.status_code == 503


def test_the_code_wins_over_the_message():
    detail = ErrorDetail(ErrorCode.TOO_MANY_IMAGES, Field.IMAGES)
    new = rpc(
        grpc.StatusCode.INVALID_ARGUMENT,
        "3 images in one request; the limit is 2",
        messages.error_metadata(detail),
    )
    error = rpc_error(new)
    assert isinstance(error, TooManyItems) and error.param == "messages"
    assert error.message == "3 images in one request; the limit is 2"

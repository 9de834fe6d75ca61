"""Failure paths that must fail fast and cleanly.

First, without servers: the admission slot of a chat request, driven at the ASGI level
(abandoned streams, failing completions, a dead engine) with vLLM replaced by a scripted
output stream; the gRPC image client against a stand-in vision service that misbehaves on
purpose (malformed frames, size limits, its own error messages); the GPU split of coupled mode.
Then, on a dedicated deployment of real processes: the same paths end to end, 413s that
Python clients can read, and a vision service that hangs (SIGSTOP) and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import signal
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
import torch
from helpers import (
    Stack,
    data_url,
    encode_image,
    noise_image,
    process_fixture,
    scrape_metric,
    start_stacks,
)
from prometheus_client import REGISTRY

from llm_server.api.serving import ChatService
from llm_server.app import create_app
from llm_server.engine.backbone import Backbone
from llm_server.engine.language_model import LanguageEngine
from llm_server.errors import (
    BadRequest,
    InvalidImage,
    Overloaded,
    RequestTooLarge,
    VisionBadResponse,
    VisionUnavailable,
)
from llm_server.images import ImageFetchPolicy, MediaLoader
from llm_server.prompt import PromptBuilder
from llm_server.settings import LLMSettings
from llm_server.vision.grpc_client import GrpcVisualEncoder
from llm_server.vision.inprocess import (
    GpuShare,
    InsufficientGpuMemory,
    llm_weight_bytes,
    shares_llm_gpu,
)
from protos import codec
from protos.dvd.v1 import vision_pb2
from protos.messages import EncodeCall, ImageInput

MODEL = "dvd-tiny-internvl"
HIDDEN = 128  # the tiny checkpoint's language-model width


# ---- admission, at the ASGI level, with a scripted engine --------------------------------


def output(text: str = "tok", index: int = 0, finish_reason: str | None = None) -> Any:
    """One step of vLLM's output stream (the fields the API reads)."""
    completion = SimpleNamespace(index=index, text=text, token_ids=[7], finish_reason=finish_reason)
    return SimpleNamespace(outputs=[completion], num_cached_tokens=0, metrics=None)


class ScriptedEngine:
    """Stands in for vLLM: every request gets the scripted outputs (an exception in the script
    is raised at that point). Counts the streams started and ended: vLLM aborts a request
    when its stream is closed, so an unended stream is a request still running."""

    model_name = MODEL
    max_model_len = 4096
    default_sampling: dict[str, Any] = {}
    hidden_size = HIDDEN
    dtype = torch.float32
    errored = False
    vocab_size = 2048
    backbone = Backbone(model_type="qwen3", architecture="Qwen3ForCausalLM")
    build_prompt = LanguageEngine.build_prompt

    def render(self, request_prompt: dict[str, Any]) -> dict[str, Any]:
        return request_prompt  # vLLM's renderer is not running here

    def check_sampling_params(self, sampling_params: Any, constraint: str | None = None) -> None:
        pass

    def __init__(self, script: list[Any], gate: asyncio.Event | None = None) -> None:
        self.script = script
        self.gate = gate  # when given, streams wait for it before their first output
        self.started = 0
        self.ended = 0

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str):
        self.started += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            for step in self.script:
                await asyncio.sleep(0.002)
                if isinstance(step, BaseException):
                    raise step
                yield step
        finally:
            self.ended += 1


class NoImages:
    """The image encoder of text-only tests: never called."""

    async def encode(self, *args: Any) -> Any:
        raise AssertionError("no image in these requests")

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def prompts(tiny_models) -> PromptBuilder:
    from transformers import AutoTokenizer

    from checkpoints.spec import load_checkpoint_spec

    path = tiny_models["hf"]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return PromptBuilder(tokenizer, load_checkpoint_spec(path).image_tokens)


def serving_app(prompts: PromptBuilder, engine: Any, encoder: Any = None, limit: int = 2):
    """The real FastAPI app and ChatService, around a scripted engine (no lifespan: nothing
    else is started). Images may come from ``localhost``."""
    settings = LLMSettings(max_concurrent_requests=limit, max_request_bytes=10_000_000)  # type: ignore[call-arg]
    images = MediaLoader(
        ImageFetchPolicy(
            max_bytes=5_000_000,
            allowed_hosts=frozenset({"localhost"}),
            timeout_s=5,
            allowed_networks=ImageFetchPolicy.networks(["127.0.0.1/32"]),
        )
    )
    app = create_app(settings)
    app.state.chat = ChatService(engine, encoder or NoImages(), prompts, images, settings)
    return app


def in_flight_gauge() -> float:
    return REGISTRY.get_sample_value("dvd:requests_in_flight") or 0.0


@pytest.fixture(autouse=True)
def _no_slot_left_held():
    """Every test gives back the slots it took. The gauge is this test process's: checked
    against its value when the test began, so a leak fails the test that leaked it, and only
    that one."""
    before = in_flight_gauge()
    yield
    assert in_flight_gauge() == before, "this test left a request slot held"


class Exchange:
    """One HTTP request driven by hand at the ASGI level. ``receive`` hands over the body,
    then reports a disconnect once ``disconnected`` is set (after ``disconnect_after_chunks``
    body messages, or never); after ``fail_send_after`` messages (the response start counts)
    ``send`` raises, as it does on a closed socket under ASGI 2.4 servers."""

    def __init__(
        self,
        body: dict[str, Any],
        *,
        spec_version: str = "2.3",
        disconnect_after_chunks: int | None = None,
        fail_send_after: int | None = None,
    ) -> None:
        self.raw = json.dumps(body).encode()
        self.spec_version = spec_version
        self.disconnect_after_chunks = disconnect_after_chunks
        self.fail_send_after = fail_send_after
        self.disconnected = asyncio.Event()
        self.calls = 0
        self.sent = 0
        self.status: int | None = None
        self.chunks: list[bytes] = []

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            return {"type": "http.request", "body": self.raw, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.fail_send_after is not None and self.sent >= self.fail_send_after:
            raise OSError("connection reset by peer")
        self.sent += 1
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        body = message.get("body", b"")
        if not body:
            return
        self.chunks.append(body)
        limit = self.disconnect_after_chunks
        if limit is not None and len(self.chunks) >= limit:
            self.disconnected.set()

    async def run(self, app: Any) -> BaseException | None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": self.spec_version},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(self.raw)).encode()),
            ],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        try:
            await app(scope, self.receive, self.send)
        except Exception as exc:  # what a server would log; kept alive on purpose
            return exc
        return None

    def json(self) -> Any:
        return json.loads(b"".join(self.chunks))


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


FULL_SCRIPT = [output("a"), output("b"), output("c", finish_reason="stop")]


def assert_released(app: Any, engine: ScriptedEngine) -> None:
    """Right after the response ended: no slot held, every engine stream closed."""
    assert in_flight_gauge() == 0
    assert engine.started == engine.ended


def test_stream_abandoned_before_its_first_chunk_releases_its_slot(prompts):
    """The client is gone between prepare and the first chunk (an ASGI 2.4 server's send
    fails on the response start): the stream is never iterated. The slot must come back
    anyway, and the next requests are served."""

    async def scenario() -> None:
        engine = ScriptedEngine(FULL_SCRIPT)
        app = serving_app(prompts, engine, limit=1)
        gone = Exchange(chat_body(stream=True), spec_version="2.4", fail_send_after=0)
        error = await gone.run(app)
        assert gone.status is None and engine.started == 0
        assert_released(app, engine)
        del error
        again = Exchange(chat_body(max_tokens=3))
        await again.run(app)
        assert again.status == 200, again.chunks

    asyncio.run(scenario())


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_stream_closed_after_its_first_chunk_releases_its_slot(prompts, spec_version):
    """The client reads the first chunk and goes (2.3: a disconnect message; 2.4: the next
    send fails). The slot is back and the engine stream closed when the response ends, not
    whenever the garbage collector gets to them."""

    async def scenario() -> None:
        engine = ScriptedEngine(FULL_SCRIPT)
        app = serving_app(prompts, engine, limit=1)
        if spec_version == "2.3":
            gone = Exchange(chat_body(stream=True), disconnect_after_chunks=1)
        else:
            gone = Exchange(chat_body(stream=True), spec_version="2.4", fail_send_after=2)
        error = await gone.run(app)
        assert gone.status == 200 and gone.chunks[0].startswith(b"data: ")
        assert_released(app, engine)
        del error
        again = Exchange(chat_body(max_tokens=3))
        await again.run(app)
        assert again.status == 200

    asyncio.run(scenario())


def test_complete_that_raises_releases_its_slot_and_closes_the_engine_stream(prompts):
    """An error while collecting a completion (here an output for a choice that does not
    exist) answers 500 and releases the slot, with the engine stream closed at once."""

    async def scenario() -> None:
        engine = ScriptedEngine([output("a"), output("b", index=3)])
        app = serving_app(prompts, engine, limit=1)
        failed = Exchange(chat_body())
        error = await failed.run(app)
        assert failed.status == 500
        assert error is not None  # still referenced: no collector can have helped
        assert_released(app, engine)
        engine.script = FULL_SCRIPT
        again = Exchange(chat_body())
        await again.run(app)
        assert again.status == 200

    asyncio.run(scenario())


def test_dead_engine_gives_503_and_releases(prompts):
    """vLLM's engine process dies mid-request: the completion gets a 503, the stream an
    error event, and both slots come back."""
    from vllm.v1.engine.exceptions import EngineDeadError

    async def scenario() -> None:
        engine = ScriptedEngine([output("a"), EngineDeadError()])
        app = serving_app(prompts, engine, limit=2)
        plain = Exchange(chat_body())
        await plain.run(app)
        assert plain.status == 503
        assert plain.json()["error"]["code"] == "engine_unavailable"
        streamed = Exchange(chat_body(stream=True))
        await streamed.run(app)
        events = b"".join(streamed.chunks).decode()
        assert '"code": "engine_unavailable"' in events and events.endswith("data: [DONE]\n\n")
        assert_released(app, engine)
        engine.errored = True  # as vLLM reports it afterwards: refused before any work
        refused = Exchange(chat_body())
        await refused.run(app)
        assert refused.status == 503 and engine.started == 2

    asyncio.run(scenario())


def test_the_limit_holds_and_every_slot_comes_back(prompts):
    async def scenario() -> None:
        gate = asyncio.Event()
        engine = ScriptedEngine(FULL_SCRIPT, gate=gate)
        app = serving_app(prompts, engine, limit=2)
        held = [Exchange(chat_body(stream=bool(i))) for i in range(2)]
        running = [asyncio.create_task(exchange.run(app)) for exchange in held]
        for _ in range(500):  # both requests reach the engine, where the gate holds them
            if engine.started == 2:
                break
            await asyncio.sleep(0.01)
        refused = Exchange(chat_body())
        await refused.run(app)
        assert refused.status == 429 and refused.json()["error"]["code"] == "overloaded"
        assert in_flight_gauge() == 2
        gate.set()
        await asyncio.gather(*running)
        assert [exchange.status for exchange in held] == [200, 200]
        assert_released(app, engine)

    asyncio.run(scenario())


def test_no_image_is_fetched_for_a_request_that_will_be_refused(prompts, image_host):
    """Admission comes before work: at the limit (429), or with the engine dead (503), a
    request's remote image is never fetched."""

    async def scenario() -> None:
        gate = asyncio.Event()
        engine = ScriptedEngine(FULL_SCRIPT, gate=gate)
        app = serving_app(prompts, engine, limit=1)
        holder = asyncio.create_task(Exchange(chat_body()).run(app))
        for _ in range(500):
            if engine.started == 1:
                break
            await asyncio.sleep(0.01)
        before = _CountingImages.fetches
        content = [{"type": "image_url", "image_url": {"url": image_host}}]
        with_image = chat_body(messages=[{"role": "user", "content": content}])
        refused = Exchange(with_image)
        await refused.run(app)
        assert refused.status == 429
        gate.set()
        await holder
        engine.errored = True
        dead = Exchange(with_image)
        await dead.run(app)
        assert dead.status == 503
        assert _CountingImages.fetches == before  # neither request fetched its image
        assert_released(app, engine)

    asyncio.run(scenario())


# ---- the gRPC image client against a misbehaving stand-in vision service ----------------


class StandInVision:
    """A vision service on 127.0.0.1 that answers Encode with ``behaviour(request, context)``
    (raw frames, or an abort) and records whether each call was cancelled by the client."""

    def __init__(
        self,
        behaviour: Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]],
        max_receive_bytes: int = 64 * 1024 * 1024,
        model_info_delay_s: float = 0.0,
    ) -> None:
        self.behaviour = behaviour
        self.model_info_delay_s = model_info_delay_s
        self.max_receive_bytes = max_receive_bytes
        self.cancelled = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.target = ""

    async def _encode(self, request: bytes, context: grpc.aio.ServicerContext):
        try:
            async for frame in self.behaviour(request, context):
                yield frame
        # A cancel that lands while gRPC is sending the last frame cancels gRPC's task, not
        # this generator: it is then closed where it stands (GeneratorExit at the yield).
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise

    async def _model_info(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(self.model_info_delay_s)
        info = vision_pb2.ModelInfo(
            model_id="stand-in", hidden_size=HIDDEN, dtype=vision_pb2.DTYPE_FLOAT32
        )
        return info.SerializeToString()

    async def __aenter__(self) -> StandInVision:
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", self.max_receive_bytes)]
        )
        handlers = {
            "Encode": grpc.unary_stream_rpc_method_handler(self._encode),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(self._model_info),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("dvd.v1.VisionService", handlers),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.target = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        await self.server.stop(0)


def header_frame(hidden: int = HIDDEN, tokens: int = 4) -> bytes:
    header = vision_pb2.ImageHeader(
        image_index=0,
        num_tiles=1,
        tokens_per_tile=[tokens],
        num_visual_tokens=tokens,
        hidden_size=hidden,
        dtype=vision_pb2.DTYPE_FLOAT32,
        num_bytes=tokens * hidden * 4,
    )
    return vision_pb2.EncodeResponse(header=header).SerializeToString()


def encode_once(vision: StandInVision, image: bytes = b"png", timeout_s: float = 20) -> Any:
    encoder = GrpcVisualEncoder(vision.target, timeout_s=timeout_s, expected_hidden_size=HIDDEN)
    return encoder, encoder.encode(EncodeCall([ImageInput(image)], request_id="req-1"))


@pytest.mark.parametrize(
    "frame",
    [b"\x12\x80", b"\x12\x05\x08" + b"\xff" * 4, b"\x0a\xff", b"\x12\x03\x1a\x09ab"],
    ids=["truncated length", "truncated varint", "undecodable header", "short data"],
)
def test_malformed_frame_is_a_502_and_the_call_is_cancelled(frame):
    async def behaviour(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield header_frame()
        yield frame
        await asyncio.sleep(30)  # the call stays open unless the client cancels it

    async def scenario() -> None:
        async with StandInVision(behaviour) as vision:
            encoder, call = encode_once(vision)
            with pytest.raises(VisionBadResponse) as caught:
                await call
            assert caught.value.status_code == 502
            assert "malformed" in caught.value.message
            # The exception (and with it the call) is still referenced: only an explicit
            # cancel can have ended the call on the service.
            await asyncio.wait_for(vision.cancelled.wait(), 5)
            await encoder.close()

    asyncio.run(scenario())


def test_local_check_failure_cancels_the_call():
    """A header for a different model fails on our side; the vision service hears of it at
    once instead of holding the call until its deadline."""

    async def behaviour(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield header_frame(hidden=HIDDEN * 2)
        await asyncio.sleep(30)

    async def scenario() -> None:
        async with StandInVision(behaviour) as vision:
            encoder, call = encode_once(vision)
            with pytest.raises(VisionBadResponse, match="different models"):
                await call
            await asyncio.wait_for(vision.cancelled.wait(), 5)
            await encoder.close()

    asyncio.run(scenario())


def test_message_size_limits_are_413_not_429():
    """grpc's own size limit (RESOURCE_EXHAUSTED) on a request is a 413 with the reason; the
    vision service's full queue (also RESOURCE_EXHAUSTED) stays a 429; an oversized reply
    is the vision service's fault (502)."""

    async def queue_full(request: bytes, context: Any) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "2048 tiles are queued")
        yield b""

    async def huge_reply(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"\x00" * (2 * codec.MAX_CHUNK_BYTES + 1024)

    async def scenario() -> None:
        async with StandInVision(queue_full, max_receive_bytes=1024 * 1024) as vision:
            encoder, call = encode_once(vision, image=b"\x89PNG" + b"\x00" * 1_500_000)
            with pytest.raises(RequestTooLarge) as too_large:
                await call
            assert too_large.value.status_code == 413
            assert "1048576" in too_large.value.message  # the limit, in the reason
            _, call = encode_once(vision)
            with pytest.raises(Overloaded, match="2048 tiles are queued"):
                await call
            await encoder.close()
        async with StandInVision(huge_reply) as vision:
            encoder, call = encode_once(vision)
            with pytest.raises(VisionBadResponse) as bad:
                await call
            assert bad.value.status_code == 502
            await encoder.close()

    asyncio.run(scenario())


def test_a_hung_vision_service_costs_one_timeout_even_on_the_first_call():
    """The model check before the first Encode shares the call's deadline: a vision service
    that accepts connections but never answers fails every concurrent request within
    --vision-timeout-s."""

    async def never(request: bytes, context: Any) -> AsyncIterator[bytes]:
        await asyncio.sleep(30)
        yield b""

    timeout_s = 2.0

    async def failed_calls(vision: StandInVision, count: int) -> float:
        """``count`` concurrent first calls on a fresh client; how long until all failed."""
        encoder = GrpcVisualEncoder(vision.target, timeout_s=timeout_s, expected_hidden_size=HIDDEN)
        started = time.monotonic()
        calls = [
            encoder.encode(EncodeCall([ImageInput(b"png")], request_id=f"r{i}"))
            for i in range(count)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        elapsed = time.monotonic() - started
        for outcome in outcomes:
            assert isinstance(outcome, VisionUnavailable) and outcome.status_code == 503
            assert "did not answer in time" in outcome.message
        await encoder.close()
        return elapsed

    async def scenario() -> None:
        async with StandInVision(never, model_info_delay_s=30) as vision:
            # The baseline, measured here: one call alone costs one timeout (and this
            # machine's overhead). Three at once must cost the same, not one timeout per call
            # waiting for another's model check (that would be twice the baseline or more).
            alone = await failed_calls(vision, 1)
            together = await failed_calls(vision, 3)
            assert together < alone + timeout_s / 2, (alone, together)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("details", "error_type", "param"),
    [
        ("max_tiles=50 exceeds this service's limit of 40", BadRequest, "max_tiles"),
        ("vir='max' needs a Visual Resolution Router", BadRequest, "vir"),
        ("vir_threshold must be in [0, 1], got 2.0", BadRequest, "vir_threshold"),
        ("image 1: cannot decode image: truncated", InvalidImage, "messages"),
    ],
)
def test_invalid_argument_keeps_the_message_and_its_field(details, error_type, param):
    async def refuse(request: bytes, context: Any) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)
        yield b""

    async def scenario() -> None:
        async with StandInVision(refuse) as vision:
            encoder, call = encode_once(vision)
            with pytest.raises(error_type) as caught:
                await call
            assert caught.value.status_code == 400
            assert caught.value.message == details and caught.value.param == param
            await encoder.close()

    asyncio.run(scenario())


def test_malformed_vision_stream_is_a_502_through_the_api(prompts):
    """The same fault seen by an HTTP client: a 502 in OpenAI's error shape, slot released."""
    import base64

    async def behaviour(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield header_frame()
        yield b"\x12\x85"

    async def scenario() -> None:
        async with StandInVision(behaviour) as vision:
            encoder = GrpcVisualEncoder(vision.target, timeout_s=20, expected_hidden_size=HIDDEN)
            engine = ScriptedEngine(FULL_SCRIPT)
            app = serving_app(prompts, engine, encoder=encoder)
            url = "data:image/png;base64," + base64.b64encode(b"\x89PNG....").decode()
            content = [{"type": "image_url", "image_url": {"url": url}}]
            exchange = Exchange(chat_body(messages=[{"role": "user", "content": content}]))
            await exchange.run(app)
            assert exchange.status == 502
            assert exchange.json()["error"]["code"] == "vision_bad_response"
            assert_released(app, engine)
            await encoder.close()

    asyncio.run(scenario())


# ---- coupled mode: the GPU split ---------------------------------------------------------

GIB = 1024**3


def test_gpu_share_gives_vllm_what_the_vision_encoder_leaves():
    share = GpuShare(
        total_bytes=80 * GIB,
        utilization=0.9,
        vision_bytes=8 * GIB,
        llm_weight_bytes=16 * GIB,
        max_batch_tiles=32,
        device="cuda:0",
    )
    assert share.llm_bytes == int(72 * GIB) - 8 * GIB
    assert share.llm_utilization() == pytest.approx(64 / 80)


@pytest.mark.parametrize(
    ("vision_gib", "llm_gib"), [(71.5, 1), (10, 62), (8, 64.5)], ids=["vit", "llm", "edge"]
)
def test_gpu_share_refuses_when_the_language_model_cannot_fit(vision_gib, llm_gib):
    share = GpuShare(
        total_bytes=80 * GIB,
        utilization=0.9,
        vision_bytes=int(vision_gib * GIB),
        llm_weight_bytes=int(llm_gib * GIB),
        max_batch_tiles=48,
        device="cuda:0",
    )
    with pytest.raises(InsufficientGpuMemory) as refused:
        share.llm_utilization()
    message = str(refused.value)
    assert "48-tile" in message and "--vision-max-batch-tiles" in message
    assert "--gpu-memory-utilization=0.9" in message and "--vision grpc" in message


def test_which_devices_share_vllm_gpus():
    assert not shares_llm_gpu("cpu", 1)
    assert shares_llm_gpu("cuda", 1) and shares_llm_gpu("cuda:0", 1)
    assert not shares_llm_gpu("cuda:1", 1)  # vLLM on GPU 0 only
    assert shares_llm_gpu("cuda:1", 2)  # tensor parallel over GPUs 0 and 1
    assert shares_llm_gpu("auto", 1) == torch.cuda.is_available()


def test_language_model_weight_bytes_match_the_tensors(tiny_models):
    from safetensors.torch import load_file

    for path in tiny_models.values():
        expected = sum(
            tensor.numel() * tensor.element_size()
            for file in Path(path).glob("*.safetensors")
            for name, tensor in load_file(file).items()
            if name.startswith("language_model.")
        )
        assert expected > 0 and llm_weight_bytes(Path(path)) == expected


# ---- end to end, on a deployment of its own ----------------------------------------------

VISION_TIMEOUT_S = 4.0
VISION_MESSAGE_LIMIT = 1024 * 1024


class _CountingImages(http.server.BaseHTTPRequestHandler):
    """An allow-listed image host that counts what it serves."""

    png = encode_image(noise_image(96, 64, seed=5))
    fetches = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).fetches += 1
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _CountingImages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}/image.png"
    server.shutdown()
    server.server_close()


@process_fixture(scope="module")
def deployment(tiny_models, log_dir) -> Iterator[Stack]:
    running = start_stacks(
        {"reliability": tiny_models["hf"]},
        log_dir,
        llm_args=[
            "--max-concurrent-requests=4",
            f"--vision-timeout-s={VISION_TIMEOUT_S}",
            "--allowed-image-hosts=localhost",
            "--allowed-image-networks=127.0.0.1/32",
        ],
        vision_args=[f"--max-message-bytes={VISION_MESSAGE_LIMIT}"],
    )
    stack = running["reliability"]
    try:
        yield stack
    finally:
        stack.stop()


def post(stack: Stack, body: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=timeout)


def image_body(url: str, **extra: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    return chat_body(messages=[{"role": "user", "content": content}], max_tokens=4, **extra)


def wait_for_no_request_in_flight(stack: Stack, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while (in_flight := scrape_metric(stack.base_url, "dvd:requests_in_flight")) != 0:
        assert time.monotonic() < deadline, f"{in_flight} requests still hold a slot"
        time.sleep(0.1)


def all_admitted(stack: Stack, count: int) -> list[int]:
    """``count`` concurrent short requests; their status codes."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            url = f"{stack.base_url}/v1/chat/completions"
            body = chat_body(max_tokens=4)
            replies = await asyncio.gather(*(client.post(url, json=body) for _ in range(count)))
            return [reply.status_code for reply in replies]

    return asyncio.run(burst())


def abandon_stream(stack: Stack, after_s: float | None) -> None:
    """Send a long streaming request and hang up: after reading its first chunk (``None``),
    or ``after_s`` seconds after sending it, whatever the server has done by then."""
    body = chat_body(stream=True, max_tokens=400, min_tokens=400)
    if after_s is None:
        with httpx.stream(
            "POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60
        ) as reply:
            assert reply.status_code == 200
            assert next(reply.iter_lines()).startswith("data: ")
        return
    raw = json.dumps(body).encode()
    host, port = stack.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        time.sleep(after_s)


@pytest.mark.slow
def test_streams_abandoned_early_leave_no_slot_behind(deployment):
    for index in range(16):
        abandon_stream(deployment, None if index % 2 else index * 0.004)
    wait_for_no_request_in_flight(deployment)
    assert all_admitted(deployment, 4) == [200] * 4  # the limit: nothing was leaked


@pytest.mark.slow
def test_overloaded_server_refuses_before_fetching_images(deployment, image_host):
    """At the limit, a request with a remote image gets its 429 without the image being
    fetched; once there is room, the same request fetches it and is served."""
    body = chat_body(stream=True, max_tokens=4000, min_tokens=4000)
    with contextlib.ExitStack() as held:
        readers = []  # held: dropping a line iterator would close its connection
        for _ in range(4):
            reply = held.enter_context(
                httpx.stream(
                    "POST", f"{deployment.base_url}/v1/chat/completions", json=body, timeout=60
                )
            )
            readers.append(reply.iter_lines())
            assert next(readers[-1]).startswith("data: ")  # admitted, generating
        before = _CountingImages.fetches
        refused = post(deployment, image_body(image_host))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        assert _CountingImages.fetches == before
    wait_for_no_request_in_flight(deployment)
    served = post(deployment, image_body(image_host))
    assert served.status_code == 200, served.text
    assert _CountingImages.fetches == before + 1


@pytest.mark.slow
def test_oversized_body_gets_a_413_that_urllib_and_httpx_can_read(deployment):
    body = b'{"model": "x", "messages": "' + b"x" * 80_000_000 + b'"}'
    url = f"{deployment.base_url}/v1/chat/completions"
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["code"] == "request_too_large"
    with httpx.Client(timeout=60) as client:
        reply = client.post(url, content=body, headers={"Content-Type": "application/json"})
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
        # The same connection goes on serving: the body was read to its end.
        assert client.post(url, json=chat_body(max_tokens=2)).status_code == 200


@pytest.mark.slow
def test_vision_refusals_keep_their_reason_and_field(deployment):
    big = data_url(noise_image(700, 600, seed=9))  # about 1.3 MB of PNG, over the 1 MiB limit
    too_large = post(deployment, image_body(big))
    assert too_large.status_code == 413, too_large.text
    assert str(VISION_MESSAGE_LIMIT) in too_large.json()["error"]["message"]
    small = data_url(noise_image(64, 64, seed=9))
    for extra, param, fragment in [
        ({"max_tiles": 50}, "max_tiles", "max_tiles=50 exceeds"),
        ({"vir": "max"}, "vir", "Visual Resolution Router"),
    ]:
        reply = post(deployment, image_body(small, **extra))
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == param and fragment in error["message"], error
    assert httpx.get(f"{deployment.base_url}/health", timeout=10).json()["vision"] == "serving"


@pytest.mark.slow
def test_hung_vision_service_fails_fast_and_recovers(deployment):
    """SIGSTOP on the vision process under load: image requests get a 503 within the vision
    deadline, /health says the vision service is unavailable, text keeps working; after
    SIGCONT everything is served again."""
    assert deployment.vision is not None
    image = data_url(noise_image(200, 150, seed=3))
    assert post(deployment, image_body(image)).status_code == 200  # connected and warm
    deployment.vision.signal(signal.SIGSTOP)
    try:

        async def under_load() -> list[tuple[int, float]]:
            async with httpx.AsyncClient(timeout=60) as client:
                url = f"{deployment.base_url}/v1/chat/completions"

                async def one(seed: int) -> tuple[int, str]:
                    body = image_body(data_url(noise_image(120, 90, seed=seed)))
                    reply = await client.post(url, json=body)
                    if reply.status_code != 503:
                        return reply.status_code, reply.text
                    assert reply.json()["error"]["code"] == "vision_unavailable"
                    return reply.status_code, reply.json()["error"]["message"]

                return list(await asyncio.gather(*(one(seed) for seed in range(3))))

        # Ended by the vision deadline (--vision-timeout-s), the only one shorter than this
        # client's 60 s: the reason says so.
        for status, message in asyncio.run(under_load()):
            assert status == 503 and "did not answer in time" in message, (status, message)
        health = httpx.get(f"{deployment.base_url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["vision"] == "unavailable"
        assert post(deployment, chat_body(max_tokens=4)).status_code == 200
    finally:
        deployment.vision.signal(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while (reply := post(deployment, image_body(image))).status_code != 200:
        assert time.monotonic() < deadline, reply.text
        time.sleep(0.5)
    assert httpx.get(f"{deployment.base_url}/health", timeout=10).json()["vision"] == "serving"
    wait_for_no_request_in_flight(deployment)

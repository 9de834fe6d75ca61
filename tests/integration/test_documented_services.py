"""Documented behaviours of the two services that need a stack of their own: one vision server
and one language server started here (real processes on 127.0.0.1), on a tiny GPT-OSS
checkpoint whose harmony header opens the ``analysis`` channel and whose transformers video
processor config samples 3 frames per video.

The language service reaches the vision service through a gRPC relay in this process, which
forwards every call byte for byte (trailing metadata too) to the backend it is set to: the
stack's own vision server, or the session's hf-layout vision server (another checkpoint); or
it cuts the stack's own reply short (a malformed stream). So the HTTP errors of the README
are produced by real services:

- 429 when the vision service's tile queue is full (a vision server started with a small
  queue, kept busy by direct calls);
- 502 when the vision service's stream is malformed;
- 503 ``vision_model_mismatch`` when the vision service serves another checkpoint, and
  answers again once it serves this one;

and, on the same stack: GPT-OSS's ``analysis`` channel is ``message.reasoning`` (whole and
streamed, against transformers' greedy tokens); the default number of frames per video comes
from the checkpoint's video processor config (language service) and from ``--num-frames``
(vision service).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from helpers import (
    LLM_TEST_ENV,
    SERVED_MODEL_NAME,
    ServerProcess,
    data_url,
    encode_image,
    encode_over_grpc,
    encode_video,
    gradient_image,
    http_ok,
    llm_server_argv,
    mixed_frames,
    noise_image,
    process_fixture,
    same_pixels_other_file,
    start_vision_server,
    video_data_url,
)
from margins import MARGIN_PARAMS, compare_greedy, served_margins
from reference import TransformersOracle
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

CHECKPOINT_FRAMES = 3  # the video processor config's num_frames
VISION_FLAG_FRAMES = 5  # the vision service's --num-frames
QUEUE_TILES = 64  # the vision service's --max-queued-tiles


# ---- the checkpoint ---------------------------------------------------------------------------


def open_the_analysis_channel(path: Path) -> None:
    """The tiny GPT-OSS model writes ``<|channel|>final<|message|>`` by planted rules (one
    reserved hidden dimension per "this token -> next token" rule, see checkpoints/tiny.py).
    Re-plant two of them so that it writes ``<|channel|>analysis<|message|>`` instead: the
    output weight that maps the <|channel|> rule to ``final`` now maps it to ``analysis``, and
    ``analysis`` (not ``final``) triggers the rule that writes <|message|>."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(path)).get_vocab()
    final, analysis = vocab["final"], vocab["analysis"]
    weights_file = path / "model.safetensors"
    weights = load_file(str(weights_file))
    embed = weights["language_model.model.embed_tokens.weight"]  # [vocab, hidden]
    head = weights["language_model.lm_head.weight"]  # [vocab, hidden]
    # A rule's dimension is zero in every other token's row: find the one where only
    # ``final`` has a value, in the output matrix (<|channel|> -> final) and in the embeddings
    # (final -> <|message|>).
    to_final = _reserved_dimension(head, final)
    from_final = _reserved_dimension(embed, final)
    head[analysis, to_final], head[final, to_final] = head[final, to_final].item(), 0.0
    embed[analysis, from_final], embed[final, from_final] = embed[final, from_final].item(), 0.0
    save_file(weights, str(weights_file), {"format": "pt"})


def _reserved_dimension(matrix: torch.Tensor, token: int) -> int:
    """The hidden dimension (column of ``matrix``, [vocab, hidden]) where ``token``'s row alone
    is not zero."""
    only = [
        dim
        for dim in range(matrix.shape[1])
        if matrix[token, dim] != 0 and torch.count_nonzero(matrix[:, dim]) == 1
    ]
    assert len(only) == 1, f"expected one planted dimension for token {token}, found {only}"
    return only[0]


@pytest.fixture(scope="module")
def analysis_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from checkpoints.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(
        tmp_path_factory.mktemp("edge") / "gpt-oss-analysis", seed=0, layout="hf", llm="gpt_oss"
    )
    open_the_analysis_channel(path)
    # transformers' video processor config: the checkpoint's own frames per video.
    (path / "video_preprocessor_config.json").write_text(
        json.dumps({"num_frames": CHECKPOINT_FRAMES})
    )
    return path


# ---- the relay --------------------------------------------------------------------------------

STREAMING_METHODS = ("/Encode", "/Watch")
# A chunk message whose length prefix promises more bytes than the frame holds.
TRUNCATED_CHUNK = b"\x12\x85"


class VisionRelay(grpc.GenericRpcHandler):
    """Forwards every call, as bytes, to ``backend``; with ``malformed``, an Encode reply is cut
    after its first message (the first image's header) by a truncated chunk."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.malformed = False
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _channel(self) -> grpc.Channel:
        with self._lock:
            target = self.backend
            if target not in self._channels:
                self._channels[target] = grpc.insecure_channel(
                    target,
                    options=[
                        ("grpc.max_receive_message_length", -1),
                        ("grpc.max_send_message_length", -1),
                    ],
                )
            return self._channels[target]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.endswith(STREAMING_METHODS):
            return grpc.unary_stream_rpc_method_handler(
                lambda request, context: self._stream(method, request, context)
            )
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._unary(method, request, context)
        )

    @staticmethod
    def _metadata(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
        return [
            (key, value)
            for key, value in context.invocation_metadata()
            if not key.startswith((":", "grpc-")) and key != "user-agent"
        ]

    @staticmethod
    def _fail(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
        context.set_trailing_metadata(tuple(error.trailing_metadata() or ()))
        context.abort(error.code(), error.details() or "")

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self._channel().unary_unary(method)(
                request, metadata=self._metadata(context), timeout=context.time_remaining()
            )
        except grpc.RpcError as error:
            self._fail(context, error)
            raise  # abort raised already

    def _stream(self, method: str, request: bytes, context: grpc.ServicerContext):
        malformed = self.malformed and method.endswith("/Encode")
        call = self._channel().unary_stream(method)(
            request, metadata=self._metadata(context), timeout=context.time_remaining()
        )
        context.add_callback(call.cancel)
        try:
            for message in call:
                yield message
                if malformed:
                    yield TRUNCATED_CHUNK
                    call.cancel()
                    return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED or context.is_active():
                self._fail(context, error)


@dataclass
class EdgeStack:
    base_url: str
    vision: ServerProcess
    vision_target: str  # the stack's own vision server, not through the relay
    relay: VisionRelay
    model: Path


@process_fixture(scope="module")
def edge(analysis_model: Path, log_dir: Path) -> Iterator[EdgeStack]:
    vision, vision_target = start_vision_server(
        "edge-vision",
        analysis_model,
        log_dir,
        extra_args=[
            "--num-frames",
            str(VISION_FLAG_FRAMES),
            "--max-queued-tiles",
            str(QUEUE_TILES),
            "--max-batch-tiles",
            "4",
            "--passes-in-flight",
            "1",
            "--embedding-cache-mb",
            "0",  # every call is encoded: the queue fills
        ],
    )
    relay = VisionRelay(vision_target)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[relay])
    relay_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    llm = ServerProcess(
        "edge-llm",
        llm_server_argv(
            analysis_model, f"127.0.0.1:{relay_port}", ["--embedding-transport", "grpc"]
        ),
        log_dir,
        env=LLM_TEST_ENV,
        report_ports=True,
    )
    try:
        base_url = f"http://127.0.0.1:{llm.reported_ports(300)['port']}"
        llm.wait_until(lambda: http_ok(f"{base_url}/health"), 300, "serving HTTP")
        yield EdgeStack(base_url, vision, vision_target, relay, analysis_model)
    finally:
        llm.stop()
        server.stop(grace=None)
        relay.close()
        vision.stop()


def post(base_url: str, messages: list[dict[str, Any]], **params: Any) -> httpx.Response:
    body = {"model": SERVED_MODEL_NAME, "messages": messages, **params}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


def image_chat(*images, **image_url: Any) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(image), **image_url}}
        for image in images
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]


def video_chat(data: bytes) -> list[dict[str, Any]]:
    part = {"type": "video_url", "video_url": {"url": video_data_url(data)}}
    return [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]


# ---- GPT-OSS: analysis -> reasoning ------------------------------------------------------------

TEXT_CHAT = [{"role": "user", "content": "Think about the weather, then answer."}]


def test_gpt_oss_analysis_channel_is_the_reasoning(edge: EdgeStack):
    oracle = TransformersOracle(edge.model)
    tokenizer = oracle.tokenizer
    expected = oracle.generate(TEXT_CHAT, [], 16)
    header = tokenizer.encode("<|channel|>analysis<|message|>", add_special_tokens=False)
    assert expected.token_ids[: len(header)] == header, "the planted header did not open"

    reply = post(
        edge.base_url,
        TEXT_CHAT,
        temperature=0,
        max_tokens=16,
        return_token_ids=True,
        **MARGIN_PARAMS,
    )
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    compare_greedy(
        choice["token_ids"],
        expected.token_ids,
        [expected.margins, served_margins(choice)],
        min_compared=len(header) + 4,
        what="GPT-OSS analysis answer against transformers",
    )
    # The analysis message's text, read by the test from the served token ids.
    reasoning = tokenizer.decode(choice["token_ids"][len(header) :], skip_special_tokens=True)
    assert reasoning.strip()
    message = choice["message"]
    assert message["reasoning"] == reasoning.rstrip("\ufffd")
    assert not message.get("content")
    assert not message.get("tool_calls")

    with httpx.stream(
        "POST",
        f"{edge.base_url}/v1/chat/completions",
        json={
            "model": SERVED_MODEL_NAME,
            "messages": TEXT_CHAT,
            "temperature": 0,
            "max_tokens": 16,
            "stream": True,
        },
        timeout=120,
    ) as stream:
        assert stream.status_code == 200
        deltas = [
            json.loads(line[len("data: ") :])["choices"]
            for line in stream.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    pieces = [choice["delta"] for choices in deltas for choice in choices]
    assert "".join(piece.get("reasoning") or "" for piece in pieces) == message["reasoning"]
    assert not any(piece.get("content") for piece in pieces)
    assert sum(1 for piece in pieces if piece.get("reasoning")) > 3  # token by token


# ---- frames per video: the checkpoint's default, and --num-frames ------------------------------

VIDEO = encode_video(mixed_frames(12, width=320, height=240, seed=53))


def test_default_frames_come_from_the_video_processor_config(edge: EdgeStack):
    reply = post(edge.base_url, video_chat(VIDEO), temperature=0, max_tokens=2)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["vision"]["frames"] == CHECKPOINT_FRAMES
    assert body["usage"]["prompt_tokens_details"]["video_tokens"] == CHECKPOINT_FRAMES * 256
    asked = post(edge.base_url, video_chat(VIDEO), temperature=0, max_tokens=2, num_frames=2)
    assert asked.status_code == 200, asked.text
    assert asked.json()["vision"]["frames"] == 2


def test_num_frames_flag_sets_the_vision_services_default(edge: EdgeStack):
    """A call that names no frame count (0) gets the vision service's --num-frames, which
    wins over the checkpoint's video processor config."""
    (reply,) = encode_over_grpc(edge.vision_target, [], videos=[(VIDEO, 0)])
    assert len(reply.header.tokens_per_tile) == VISION_FLAG_FRAMES
    assert reply.embeddings.shape[0] == VISION_FLAG_FRAMES * 256


# ---- HTTP errors from real services ---------------------------------------------------------


def test_malformed_vision_stream_is_a_502(edge: EdgeStack):
    messages = image_chat(gradient_image(448, 448, seed=54))
    edge.relay.malformed = True
    try:
        reply = post(edge.base_url, messages, temperature=0, max_tokens=2)
    finally:
        edge.relay.malformed = False
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"]["code"] == "vision_bad_response"
    # The stream was the only fault: the same request is answered once it is whole.
    again = post(edge.base_url, messages, temperature=0, max_tokens=2)
    assert again.status_code == 200, again.text


def test_vision_service_of_another_checkpoint_is_a_503(edge: EdgeStack, stacks):
    """The session's hf-layout vision server serves the tiny Qwen3 checkpoint (same embedding
    width, another digest); while the relay leads there, image requests get 503 with a
    Retry-After, text requests are still answered; back on the stack's own vision server,
    image requests are answered again."""
    messages = image_chat(gradient_image(448, 448, seed=55))
    edge.relay.backend = stacks["hf"].vision_target
    try:
        refused = post(edge.base_url, messages, temperature=0, max_tokens=2)
        text = post(edge.base_url, TEXT_CHAT, temperature=0, max_tokens=2)
    finally:
        edge.relay.backend = edge.vision_target
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "vision_model_mismatch"
    assert "retry-after" in refused.headers
    assert text.status_code == 200, text.text
    again = post(edge.base_url, messages, temperature=0, max_tokens=2)
    assert again.status_code == 200, again.text


def test_full_vision_queue_is_a_429(edge: EdgeStack):
    """Direct calls keep the vision service's tile queue busy (11 tiles each, distinct files:
    no cache); a request whose admission bound is the whole queue (two images at
    max_tiles=40: 82 tiles, capped at the queue's 64) is refused whenever a single tile is
    waiting. Requests are sent until one is refused; every other one is answered."""
    stop = threading.Event()
    filler_image = encode_image(noise_image(700, 300, seed=56))  # a 5x2 grid and a thumbnail

    def fill(worker: int) -> None:
        count = 0
        while not stop.is_set():
            count += 1
            data = same_pixels_other_file(filler_image, f"{worker}-{count}")
            # Refused while the queue is full: the next one tries again.
            with contextlib.suppress(grpc.RpcError):
                encode_over_grpc(edge.vision_target, [data], request_id=f"fill-{worker}")

    fillers = [threading.Thread(target=fill, args=(i,), daemon=True) for i in range(4)]
    for thread in fillers:
        thread.start()
    messages = image_chat(gradient_image(448, 448, seed=57), gradient_image(448, 448, seed=58))
    statuses: list[int] = []
    refused = None
    try:
        deadline = time.monotonic() + 90
        while refused is None and time.monotonic() < deadline:
            reply = post(edge.base_url, messages, temperature=0, max_tokens=1, max_tiles=40)
            statuses.append(reply.status_code)
            if reply.status_code == 429:
                refused = reply
            else:
                assert reply.status_code == 200, reply.text
    finally:
        stop.set()
        for thread in fillers:
            thread.join(30)
    assert refused is not None, f"no request was refused in {len(statuses)}"
    error = refused.json()["error"]
    assert error["code"] == "overloaded", error
    assert "queue" in error["message"], error
    # Once the load is gone, the same request is answered.
    reply = post(edge.base_url, messages, temperature=0, max_tokens=1, max_tiles=40)
    assert reply.status_code == 200, reply.text

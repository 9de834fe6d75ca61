"""Test support: real server processes on 127.0.0.1, images, and a small gRPC client."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from protos.codec import EmbeddingAssembler
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server started as a real process; its output goes to a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.metrics_url: str | None = None
        self.log_path = log_dir / f"{name}.log"
        merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=merged,
            cwd=REPO_ROOT,
            start_new_session=True,  # so stop() can signal the whole process group
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}) before {what}:\n{self.log_tail()}"
                )
            try:
                if ready():
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not {what} after {timeout:.0f} s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        if self.alive:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def grpc_serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def vision_server_argv(
    model: Path, port: int, extra_args: Sequence[str] = (), metrics_port: int | None = None
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vision_server.server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port or free_port()),
        *extra_args,
    ]


def start_vision_server(
    name: str,
    model: Path,
    log_dir: Path,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> tuple[ServerProcess, str]:
    port, metrics_port = free_port(), free_port()
    argv = vision_server_argv(model, port, extra_args, metrics_port)
    server = ServerProcess(name, argv, log_dir, env=env)
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    target = f"127.0.0.1:{port}"
    server.wait_until(lambda: grpc_serving(target), timeout=120, what="serving")
    return server, target


# ---- images ---------------------------------------------------------------------------------


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def gradient_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    colours = rng.uniform(0, 255, (2, 3))
    pixels = colours[0] * x + colours[1] * y
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def same_pixels_other_file(data: bytes, tag: str) -> bytes:
    """The same picture as another PNG file (a text chunk differs): the vision service's
    embedding cache, keyed by the file's bytes, encodes it again."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("dvd-test", tag)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def encode_video(
    frames: Sequence[np.ndarray],
    codec: str = "libx264",
    fmt: str = "mp4",
    fps: int = 10,
    pix_fmt: str = "yuv420p",
) -> bytes:
    """A video file of ``frames`` (``[h, w, 3]`` uint8 RGB arrays), made with PyAV."""
    import av

    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def grey_level_frames(count: int, width: int = 320, height: int = 240) -> list[np.ndarray]:
    """Flat frames whose grey level says which frame they are: frame k is 8 k."""
    return [np.full((height, width, 3), 8 * k, dtype=np.uint8) for k in range(count)]


def mixed_frames(
    count: int, width: int = 320, height: int = 240, seed: int = 0
) -> list[np.ndarray]:
    """Frames that alternate between noise and smooth gradients (varied answers, varied
    router decisions)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(count):
        if k % 2:
            frames.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        else:
            frames.append(np.asarray(gradient_image(width, height, seed=seed + k)))
    return frames


def video_data_url(data: bytes, mime: str = "video/mp4") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---- gRPC client ----------------------------------------------------------------------------


@dataclass
class EncodedReply:
    header: vision_pb2.ImageHeader
    embeddings: torch.Tensor


def encode_over_grpc(
    target: str,
    images: Sequence[bytes],
    max_tiles: int = 0,
    vir_mode: int = 0,
    request_id: str = "test",
    timeout: float = 60,
    vir_threshold: float | None = None,
    videos: Sequence[tuple[bytes, int]] = (),
) -> list[EncodedReply]:
    """Call Encode and reassemble every item's embeddings with the project codec (the
    images', then the videos': ``(bytes, num_frames)``)."""
    request = vision_pb2.EncodeRequest(
        request_id=request_id,
        images=[vision_pb2.Image(data=data) for data in images],
        options=vision_pb2.EncodeOptions(
            max_tiles=max_tiles, vir_mode=vir_mode, vir_threshold=vir_threshold
        ),
        videos=[vision_pb2.Video(data=data, num_frames=frames) for data, frames in videos],
    )
    replies: list[EncodedReply] = []
    with grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        header = None
        assembler = None
        for message in stub.Encode(request, timeout=timeout):
            if message.HasField("header"):
                header = message.header
                assembler = EmbeddingAssembler(
                    (header.num_visual_tokens, header.hidden_size), header.dtype
                )
            else:
                assert assembler is not None and header is not None
                assert message.chunk.image_index == header.image_index
                assembler.add(message.chunk.offset, message.chunk.data)
                if assembler.complete:
                    replies.append(EncodedReply(header, assembler.tensor()))
    return replies


def http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=2).status_code == 200


@dataclass
class Stack:
    """A vision server and a language server wired together, as in a deployment; or, for
    the coupled baseline, a language server encoding images in its own process."""

    vision: ServerProcess | None
    llm: ServerProcess
    vision_target: str
    base_url: str  # http://127.0.0.1:PORT

    def stop(self) -> None:
        self.llm.stop()
        if self.vision is not None:
            self.vision.stop()


SERVED_MODEL_NAME = "dvd-tiny-internvl"


def llm_server_argv(
    model: Path, port: int, vision_target: str, extra_args: Sequence[str] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llm_server.server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--vision-target",
        vision_target,
        "--enforce-eager",
        "--served-model-name",
        SERVED_MODEL_NAME,
        *extra_args,
    ]


# vLLM's CPU backend pins its worker to core 0 by default; tests run several engines at once.
LLM_TEST_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


def start_stacks(
    models: dict[str, Path],
    log_dir: Path,
    llm_args: Sequence[str] = (),
    vision_args: Sequence[str] = (),
    coupled: frozenset[str] = frozenset(),
    llm_args_by_name: dict[str, Sequence[str]] | None = None,
    llm_env: dict[str, str] | None = None,
) -> dict[str, Stack]:
    """Start one vision + one language server per model (just a language server with
    ``--vision inprocess`` for names in ``coupled``), all at once, and wait for them."""
    llm_args_by_name = llm_args_by_name or {}
    pending = []
    for name, model in models.items():
        vision_port, http_port = free_port(), free_port()
        vision_target = f"127.0.0.1:{vision_port}"
        vision = None
        extra = [*llm_args, *llm_args_by_name.get(name, ())]
        if name in coupled:
            extra += ["--vision", "inprocess"]
        if name not in coupled:
            metrics_port = free_port()
            vision = ServerProcess(
                f"{name}-vision",
                vision_server_argv(model, vision_port, vision_args, metrics_port),
                log_dir,
            )
            vision.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        llm = ServerProcess(
            f"{name}-llm",
            llm_server_argv(model, http_port, vision_target, extra),
            log_dir,
            env={**LLM_TEST_ENV, **(llm_env or {})},
        )
        pending.append((name, Stack(vision, llm, vision_target, f"http://127.0.0.1:{http_port}")))
    stacks: dict[str, Stack] = {}
    try:
        for name, stack in pending:
            if stack.vision is not None:
                stack.vision.wait_until(
                    lambda s=stack: grpc_serving(s.vision_target), 120, "serving gRPC"
                )
            stack.llm.wait_until(
                lambda s=stack: http_ok(f"{s.base_url}/health"), 300, "serving HTTP"
            )
            stacks[name] = stack
    except BaseException:
        for _, stack in pending:
            stack.stop()
        raise
    return stacks


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    import base64

    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(encode_image(image, fmt)).decode()}"


def scrape_metric(base_url: str, name: str) -> float:
    """The sum of one Prometheus series' samples on ``base_url``/metrics (0 if absent)."""
    import re

    import httpx

    total = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        match = re.match(r"^([\w:]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if match and match.group(1) == name:
            total += float(match.group(3))
    return total

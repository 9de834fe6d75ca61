"""Test support: real server processes on 127.0.0.1, images, and a small gRPC client."""

from __future__ import annotations

import errno
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
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from llm_server.port_file import read_port_file
from protos.codec import EmbeddingAssembler
from protos.dvd.v1 import vision_pb2, vision_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port free on 127.0.0.1 at this moment: another process may bind it before the server
    it is meant for does. Only for the Kubernetes simulation, where every pod of a Deployment
    listens on the port its manifest fixes, and the pods start at once (the vision pods wait
    for the checkpoint that the language pod writes, so none can report its port first).
    Everything else starts servers on port 0 and reads their port file (``report_ports``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Tests that start server processes are marked `processes` (`make test-fast` deselects them).
# A fixture that starts one is declared with `process_fixture`, and every test whose fixture
# closure includes it is marked at collection (tests/conftest.py); a test that starts one
# itself carries the mark in its module. `ServerProcess` refuses to start inside a test
# without the mark, so the fast tier can never start a server by accident.
PROCESS_FIXTURES: set[str] = set()
PROCESSES_MARK = "processes"
_current_test_marked: list[bool] = []  # set by conftest around each test's setup and call


def process_fixture(*args: Any, **kwargs: Any) -> Any:
    """``pytest.fixture`` for a fixture that starts server processes (same arguments)."""

    def declare(function: Any) -> Any:
        PROCESS_FIXTURES.add(kwargs.get("name") or function.__name__)
        return pytest.fixture(**kwargs)(function)

    if args and callable(args[0]):
        return declare(args[0])
    return declare


def _check_processes_mark(name: str) -> None:
    if _current_test_marked and not _current_test_marked[-1]:
        raise RuntimeError(
            f"a test without the `{PROCESSES_MARK}` mark started the {name} server: declare "
            "its fixture with helpers.process_fixture or mark the test module"
        )


class ServerProcess:
    """A server started as a real process; its output goes to a log file.

    With ``report_ports``, the server (ours, or anything that takes ``--port-file``) is given
    ``--port-file`` and ``reported_ports()`` reads the ports it bound itself (``--port 0``):
    no test chooses a free port and races other processes for it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        report_ports: bool = False,
    ):
        _check_processes_mark(name)
        self.name = name
        self.metrics_url: str | None = None
        self.log_path = log_dir / f"{name}.log"
        self.port_file: Path | None = None
        self._ports: dict[str, Any] | None = None
        if report_ports:
            self.port_file = log_dir / f"{name}.ports.json"
            self.port_file.unlink(missing_ok=True)
            argv = [*argv, "--port-file", str(self.port_file)]
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

    def reported_ports(self, timeout: float) -> dict[str, Any]:
        """What the server wrote to its port file once serving (``host``, ``port``, ...),
        waiting up to ``timeout`` for it."""
        if self._ports is None:
            port_file = self.port_file
            assert port_file is not None, f"{self.name} was not started with report_ports"
            self.wait_until(
                lambda: read_port_file(port_file, self.proc.pid) is not None,
                timeout,
                "serving (no port file)",
            )
            self._ports = read_port_file(port_file, self.proc.pid)
            assert self._ports is not None
        return self._ports

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


def vision_server_argv(model: Path, extra_args: Sequence[str] = (), port: int = 0) -> list[str]:
    """A vision server on ``port`` (0: one it binds itself), metrics on a port of its own."""
    return [
        sys.executable,
        "-m",
        "vision_server.server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *extra_args,
    ]


def serving_vision(server: ServerProcess, timeout: float = 120) -> str:
    """Wait until a vision server started with ``report_ports`` serves; its gRPC target (and
    its ``metrics_url``, set)."""
    ports = server.reported_ports(timeout)
    host = ports["host"]
    if ports.get("metrics_port"):
        server.metrics_url = f"http://{host}:{ports['metrics_port']}/metrics"
    target = f"{host}:{ports['port']}"
    server.wait_until(lambda: grpc_serving(target), timeout=timeout, what="serving")
    return target


def start_vision_server(
    name: str,
    model: Path,
    log_dir: Path,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> tuple[ServerProcess, str]:
    argv = vision_server_argv(model, extra_args)
    server = ServerProcess(name, argv, log_dir, env=env, report_ports=True)
    return server, serving_vision(server)


def wait_port_released(host: str, port: int, timeout: float = 30) -> None:
    """Wait until nothing listens on ``host:port`` any more (a server stopped there), so that
    a server restarted on the same address can bind it. The probe binds as our servers do
    (SO_REUSEADDR: connections of the old process in TIME_WAIT do not block it), but without
    SO_REUSEPORT, with which gRPC would join a listener that is still there."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return
            except OSError as error:
                if error.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


def restart_vision_server(
    old: ServerProcess,
    name: str,
    model: Path,
    target: str,
    log_dir: Path,
    extra_args: Sequence[str] = (),
) -> ServerProcess:
    """Stop ``old`` (if it still runs) and start a vision server on its address ``target``
    again, once the old one has released the port (the language service names the address:
    it cannot move)."""
    old.stop()
    host, port = target.rsplit(":", 1)
    wait_port_released(host, int(port))
    argv = vision_server_argv(model, extra_args, port=int(port))
    server = ServerProcess(name, argv, log_dir, report_ports=True)
    serving_vision(server)
    return server


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
    """A video file of ``frames`` (``[h, w, 3]`` uint8 RGB arrays), made with PyAV.

    SVT-AV1 (``libsvtav1``), run as root, switches the calling thread to SCHED_FIFO priority
    99 and leaves it so; every process the test process starts afterwards would inherit that
    policy, and a busy-polling vLLM worker at real-time priority starves the machine. The
    calling thread's policy is put back once the video is made."""
    import av

    policy, priority = os.sched_getscheduler(0), os.sched_getparam(0)
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    try:
        with av.open(buffer, "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            for pixels in frames:
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    finally:
        if os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, priority)
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


def llm_server_argv(model: Path, vision_target: str, extra_args: Sequence[str] = ()) -> list[str]:
    """A language server on a port it binds itself (the vision target unset: "")."""
    return [
        sys.executable,
        "-m",
        "llm_server.server",
        "--model",
        str(model),
        "--port",
        "0",
        *(["--vision-target", vision_target] if vision_target else []),
        "--enforce-eager",
        "--served-model-name",
        SERVED_MODEL_NAME,
        *extra_args,
    ]


# vLLM's CPU backend pins its worker to core 0 by default; tests run several engines at once.
# A quarter GiB of KV cache holds the tiny models' contexts many times over, and keeps the
# engines the suite runs at once (up to ten) within a 24 GiB machine.
LLM_TEST_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "DVD_CPU_KV_CACHE_GIB": "0.25"}


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
    ``--vision inprocess`` for names in ``coupled``), and wait for them. Every server binds
    its own ports; a language server starts as soon as its vision server has reported its
    port (which its --vision-target names); all vision servers start at once."""
    llm_args_by_name = llm_args_by_name or {}
    visions = {
        name: ServerProcess(
            f"{name}-vision", vision_server_argv(model, vision_args), log_dir, report_ports=True
        )
        for name, model in models.items()
        if name not in coupled
    }
    started: list[ServerProcess] = list(visions.values())
    try:
        llms: dict[str, tuple[ServerProcess, str]] = {}
        for name, model in models.items():
            extra = [*llm_args, *llm_args_by_name.get(name, ())]
            vision_target = ""  # the coupled baseline encodes in its own process
            if name in coupled:
                extra += ["--vision", "inprocess"]
            else:
                vision_target = serving_vision(visions[name])
            llm = ServerProcess(
                f"{name}-llm",
                llm_server_argv(model, vision_target, extra),
                log_dir,
                env={**LLM_TEST_ENV, **(llm_env or {})},
                report_ports=True,
            )
            started.append(llm)
            llms[name] = (llm, vision_target)
        stacks: dict[str, Stack] = {}
        for name, (llm, vision_target) in llms.items():
            base_url = f"http://127.0.0.1:{llm.reported_ports(300)['port']}"
            llm.wait_until(lambda u=base_url: http_ok(f"{u}/health"), 300, "serving HTTP")
            stacks[name] = Stack(visions.get(name), llm, vision_target, base_url)
    except BaseException:
        for server in reversed(started):
            server.stop()
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

"""`dvd-bench-vision`: the vision service's throughput, raw and served, on CPU or CUDA.

    dvd-bench-vision --preset vision-300m --concurrency 1 16 64 --vir off auto
    dvd-bench-vision --model /models/InternVL3_5-1B-Flash --output vision.json

**Raw**: the encoder alone, as the service runs it (uint8 tiles already on the device,
normalisation, InternViT, pixel shuffle, projectors, and on Flash checkpoints the router):
tiles/s for each batch size.

**Served**: a real ``dvd-vision-server`` process, fed by concurrent Encode calls from this
process through the language service's own gRPC client, with synthetic images of the chosen
size (text-like on the left, flat on the right, so the router has something to decide):
tiles/s, latency percentiles, and the ratio to raw at the server's batch size.

**Stages** (``--stages``): the same levels in this process, no gRPC: the engine alone
(tiles already cut, so batching, the device and the copies back) and the whole pipeline
(image bytes in: decoding and tiling too). With the served figures they show where the time
goes between the raw encoder and a gRPC client.

Without ``--model`` the checkpoint is one of ``dvd-tiny-model``'s presets (random weights,
real geometry; written once under ``--cache-dir``). JSON goes to ``--output``; a table is
printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.stand_in import StandInDevice
from checkpoints.spec import CheckpointSpec, load_checkpoint_spec
from checkpoints.tiny import PRESETS, write_tiny_checkpoint
from llm_server.port_file import read_port_file
from llm_server.vision.grpc_client import GrpcVisualEncoder
from protos.messages import EncodeCall, EncodeOptions, ImageInput
from protos.options import VirMode
from protos.tiling import plan_tiles
from vision_server.cuda_graphs import GraphedForward
from vision_server.data_path import compute_dtype_for_device, resolve_device
from vision_server.invariance import chunk_tiles, chunked, use_deterministic_cuda_kernels
from vision_server.model.encoder import TileEmbeddings, TileNormaliser, VisionEncoder

DEFAULT_CACHE = Path("~/.cache/dvd/bench-vision").expanduser()
BUSY_SAMPLE = "dvd:vision_device_busy_seconds_total"
# Read around each level: device-busy time, the tiles and number of forward passes, and the
# CPU time of the process that serves (prometheus-client's process collector) and of its media
# worker processes, which decode and tile the images.
LEVEL_SAMPLES = (
    BUSY_SAMPLE,
    "dvd:vision_batch_tiles_sum",
    "dvd:vision_batch_tiles_count",
    "process_cpu_seconds_total",
    "dvd:vision_media_worker_cpu_seconds_total",
)
# Served levels also read how the rows went back (shared memory or the gRPC stream), and how
# long the server spent on each call (the rest of the latency is the client and the hop).
SERVED_SAMPLES = (
    'dvd:vision_embedding_bytes_total{transport="shared_memory"}',
    'dvd:vision_embedding_bytes_total{transport="grpc"}',
    "dvd:vision_request_seconds_sum",
    "dvd:vision_request_seconds_count",
)


# ---- the checkpoint -------------------------------------------------------------------------


def checkpoint_path(args: argparse.Namespace) -> Path:
    """``--model``, or the preset's checkpoint (written on first use)."""
    if args.model:
        return Path(args.model)
    name = f"{args.preset}{'-flash' if args.flash else ''}"
    path = Path(args.cache_dir).expanduser() / name
    if not (path / "config.json").exists():
        print(f"writing the {name} checkpoint to {path} (once)", file=sys.stderr, flush=True)
        write_tiny_checkpoint(path, seed=0, layout="original", flash=args.flash, preset=args.preset)
    return path


# ---- raw ------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RawEncoder:
    """The encoder alone, loaded once, timed on random uint8 tiles already on the device:
    eagerly, and (on CUDA, unless turned off) replayed from a CUDA graph as the service runs
    it."""

    def __init__(
        self,
        spec: CheckpointSpec,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool,
        chunk_tiles: int = 0,
    ) -> None:
        self.encoder = VisionEncoder.from_checkpoint(spec, device, dtype)
        self.normalise = TileNormaliser(spec.image_mean, spec.image_std, device)
        self.device, self.dtype = device, dtype
        self.tile_size = spec.vision.image_size
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        # With batch invariance, a pass runs in fixed-shape chunks, as the service runs it.
        self.eager = chunked(self._forward, chunk_tiles) if chunk_tiles else self._forward

    def _forward(self, tiles: torch.Tensor) -> TileEmbeddings:
        return self.encoder(self.normalise(tiles, self.dtype))

    def _time(
        self,
        forward: Callable[[torch.Tensor], Any],
        tiles: torch.Tensor,
        min_seconds: float,
        min_iters: int,
    ) -> tuple[int, float]:
        with torch.inference_mode():
            for _ in range(2):  # warm-up: kernels, allocator, lazy initialisation
                forward(tiles)
            _synchronize(self.device)
            iterations, started = 0, time.perf_counter()
            while iterations < min_iters or time.perf_counter() - started < min_seconds:
                forward(tiles)
                iterations += 1
                if iterations % 4 == 0:
                    _synchronize(self.device)  # a short queue, so the clock means something
            _synchronize(self.device)
            return iterations, time.perf_counter() - started

    def measure(self, batch: int, min_seconds: float, min_iters: int) -> dict[str, Any]:
        """tiles/s at one batch size (``tiles_per_s``: as the service runs it)."""
        generator = torch.Generator().manual_seed(batch)
        size = self.tile_size
        tiles = torch.randint(0, 256, (batch, 3, size, size), generator=generator)
        tiles = tiles.to(torch.uint8).to(self.device)
        iterations, seconds = self._time(self.eager, tiles, min_seconds, min_iters)
        result: dict[str, Any] = {
            "batch_tiles": batch,
            "iterations": iterations,
            "ms_per_pass": 1000 * seconds / iterations,
            "tiles_per_s": batch * iterations / seconds,
            "eager_tiles_per_s": batch * iterations / seconds,
        }
        if self.cuda_graphs:
            try:
                graphed = GraphedForward(self.eager, self.device, (3, size, size), [batch])
            except Exception as exc:  # noqa: BLE001 - reported; the eager figures stand
                result["cuda_graph_error"] = repr(exc)
            else:
                iterations, seconds = self._time(graphed, tiles, min_seconds, min_iters)
                del graphed
                result.update(
                    cuda_graph=True,
                    iterations=iterations,
                    ms_per_pass=1000 * seconds / iterations,
                    tiles_per_s=batch * iterations / seconds,
                )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # leave the device's memory to the server
        return result


# ---- served ---------------------------------------------------------------------------------


def synthetic_image(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """Text-like dark marks on white on the left half, one flat colour on the right."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 235, dtype=np.uint8)
    half = width // 2
    for top in range(8, height - 16, 20):  # lines of "words": short dark runs
        left = 8
        while left < half - 24:
            word = int(rng.integers(12, 48))
            pixels[top : top + 12, left : min(left + word, half - 8)] = rng.integers(0, 60)
            left += word + int(rng.integers(6, 14))
    pixels[:, half:] = (90, 140, 200)
    buffer = io.BytesIO()
    options = {"quality": 90} if fmt.lower() == "jpeg" else {}
    Image.fromarray(pixels).save(buffer, fmt.upper(), **options)
    return buffer.getvalue()


def _serving(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def vision_server(
    model: Path,
    server_args: list[str],
    log_path: Path,
    start_timeout: float,
    stand_in_pass_ms: tuple[float, float] | None = None,
) -> Iterator[tuple[str, str]]:
    """A ``dvd-vision-server`` process on ports it binds itself (on a stand-in device with
    ``stand_in_pass_ms``); yields its target and metrics URL."""
    port_file = log_path.with_name(f"{log_path.name}.ports.json")
    port_file.unlink(missing_ok=True)
    program = ["vision_server.server"]
    if stand_in_pass_ms is not None:
        program = ["benchmarks.stand_in", *(f"{ms:g}" for ms in stand_in_pass_ms)]
    argv = [
        sys.executable,
        "-m",
        *program,
        "--model",
        str(model),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--port-file",
        str(port_file),
        *server_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            ports = None  # what it bound, in its port file once it serves
            while ports is None or not _serving(f"127.0.0.1:{ports['port']}"):
                ports = ports or read_port_file(port_file, process.pid)
                if process.poll() is not None:
                    raise RuntimeError(
                        f"vision server exited ({process.returncode}); see {log_path}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vision server not serving after {start_timeout:.0f} s")
                time.sleep(0.5)
            target = f"127.0.0.1:{ports['port']}"
            yield target, f"http://127.0.0.1:{ports['metrics_port']}/metrics"
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_level(
    encode_one: Callable[[], Awaitable[tuple[int, int, bool]]],
    concurrency: int,
    requests: int,
    read_counters: Callable[[], dict[str, float | None]],
) -> dict[str, Any]:
    """``requests`` calls of ``encode_one`` (-> tiles, visual tokens, cache hit),
    ``concurrency`` at a time, after one warm-up round. ``read_counters`` reads the encoder's
    device-busy counter (None: unknown)."""
    latencies: list[float] = []
    tiles: list[int] = []
    tokens: list[int] = []
    cached = 0
    remaining = requests

    async def one(record: bool) -> None:
        nonlocal cached
        started = time.perf_counter()
        num_tiles, num_tokens, from_cache = await encode_one()
        cached += from_cache
        if record:
            latencies.append(time.perf_counter() - started)
            tiles.append(num_tiles)
            tokens.append(num_tokens)

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one(record=True)

    await asyncio.gather(*(one(record=False) for _ in range(concurrency)))
    before = read_counters()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    after = read_counters()

    def grown(sample: str) -> float | None:
        first, last = before.get(sample), after.get(sample)
        return None if first is None or last is None else last - first

    busy, pass_tiles, passes, cpu_seconds, worker_seconds = (
        grown(sample) for sample in LEVEL_SAMPLES
    )
    shared_bytes, streamed_bytes, call_seconds, calls = (grown(sample) for sample in SERVED_SAMPLES)
    rows_bytes = (shared_bytes or 0.0) + (streamed_bytes or 0.0)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": wall,
        "tiles_per_s": sum(tiles) / wall,
        "images_per_s": len(latencies) / wall,
        "tiles_per_image": statistics.mean(tiles),
        "visual_tokens_per_image": statistics.mean(tokens),
        "cache_hits": cached,  # 0: every image was encoded (the server runs without a cache)
        # The fraction of the time the encoder computed (dvd:vision_device_busy_seconds).
        "device_busy": None if busy is None else busy / wall,
        # Mean tiles per forward pass (dvd:vision_batch_tiles): small passes at a high
        # concurrency mean the tile queue ran dry.
        "tiles_per_pass": pass_tiles / passes if pass_tiles is not None and passes else None,
        # CPU time of the serving process per image (in process: the bench's own process,
        # clients included), all threads, and of its media workers: what one image costs the
        # host.
        "cpu_ms_per_image": (
            None
            if cpu_seconds is None
            else 1000 * (cpu_seconds + (worker_seconds or 0.0)) / len(latencies)
        ),
        # The media workers' share of it (decoding and tiling).
        "worker_cpu_ms_per_image": (
            None if worker_seconds is None else 1000 * worker_seconds / len(latencies)
        ),
        # The share of the rows written into the client's shared memory (the rest streamed
        # over gRPC); None in process.
        "shared_memory_share": (shared_bytes or 0.0) / rows_bytes if rows_bytes else None,
        # The server's mean time per Encode call, from request to its last byte; None in
        # process. Latency beyond it is the client's and the hop's.
        "server_ms_per_call": 1000 * call_seconds / calls if call_seconds and calls else None,
        "latency_ms": {
            "mean": 1000 * statistics.mean(latencies),
            "p50": 1000 * percentile(latencies, 0.5),
            "p90": 1000 * percentile(latencies, 0.9),
            "p99": 1000 * percentile(latencies, 0.99),
        },
    }


def measure_stages(
    path: Path,
    device: torch.device,
    server_settings: dict[str, Any],
    image: bytes,
    modes: list[VirMode],
    concurrencies: list[int],
    requests_for: Callable[[int], int],
    stand_in_pass_ms: tuple[float, float] | None = None,
) -> list[dict[str, Any]]:
    """The served levels in this process, without gRPC: the engine fed prepared tiles, and the
    pipeline fed image bytes (the server's own classes and settings); with
    ``stand_in_pass_ms``, on a stand-in device (``StandInDevice``)."""
    from prometheus_client import REGISTRY

    from protos.tiling import TilingOptions
    from vision_server.preprocess import ImageLimits, prepare_image
    from vision_server.server import build_pipeline
    from vision_server.settings import VisionSettings

    settings = VisionSettings(model=str(path), device=str(device), **server_settings)
    pipeline, _ = build_pipeline(settings)
    engine = pipeline.engine
    spec = pipeline.spec
    if stand_in_pass_ms is not None:
        stand_in = StandInDevice(*stand_in_pass_ms, spec)
        engine.batcher.run_pass = stand_in.run_pass
    prepared = prepare_image(
        image, ImageLimits(), TilingOptions(spec.min_tiles, spec.max_tiles, spec.use_thumbnail)
    )
    levels: list[dict[str, Any]] = []

    async def run_all() -> None:
        engine.start()
        try:
            for stage in ("engine", "pipeline"):
                for mode in modes:

                    async def one(
                        mode: VirMode = mode, stage: str = stage
                    ) -> tuple[int, int, bool]:  # noqa: E501
                        if stage == "engine":
                            items = engine.encode_request([prepared], "bench-vision", mode)
                            (encoded,) = [item async for item in items]
                            return len(encoded.tokens_per_tile), encoded.num_visual_tokens, False
                        call = EncodeCall([ImageInput(image)], (), EncodeOptions(vir=mode))
                        (item,) = [item async for item in pipeline.encode(call)]
                        return len(item.tokens_per_tile), item.num_visual_tokens, False

                    for concurrency in concurrencies:
                        level = await run_level(
                            one,
                            concurrency,
                            requests_for(concurrency),
                            lambda: {n: REGISTRY.get_sample_value(n) for n in LEVEL_SAMPLES},
                        )
                        if stand_in_pass_ms is not None:
                            level["stand_in_pass_ms"] = list(stand_in_pass_ms)
                        levels.append({"stage": stage, "vir": mode.value, **level})
                        print(
                            f"{stage} vir={mode.value} c={concurrency}: "
                            f"{level['tiles_per_s']:.1f} tiles/s",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            await engine.stop()
            pipeline.close()

    asyncio.run(run_all())
    if device.type == "cuda":
        del pipeline, engine
        torch.cuda.empty_cache()  # leave the device's memory to the server
    return levels


def scrape_counters(metrics_url: str, samples: Sequence[str]) -> dict[str, float | None]:
    """Samples of a server's Prometheus page, named as ``name`` or ``name{label="value"}``
    (None when absent)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    found: dict[str, float | None] = dict.fromkeys(samples)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            if key in found:
                found[key] = float(sample.value)
    return found


async def measure_served(
    metrics_url: str,
    target: str,
    hidden_size: int,
    image: bytes,
    vir: VirMode,
    concurrency: int,
    requests: int,
    shared_memory_bytes: int,
) -> dict[str, Any]:
    """``requests`` Encode calls, ``concurrency`` at a time, after one warm-up round."""
    client = GrpcVisualEncoder(
        target,
        timeout_s=900,
        expected_hidden_size=hidden_size,
        transport="auto" if shared_memory_bytes else "grpc",
        shared_memory_bytes=shared_memory_bytes or 1,
    )
    call = EncodeCall([ImageInput(image)], (), EncodeOptions(vir=vir), "bench-vision")

    async def one() -> tuple[int, int, bool]:
        (encoded,) = (await client.encode(call)).images
        return len(encoded.tokens_per_tile), encoded.num_visual_tokens, encoded.from_cache

    try:
        level = await run_level(
            one,
            concurrency,
            requests,
            lambda: scrape_counters(metrics_url, (*LEVEL_SAMPLES, *SERVED_SAMPLES)),
        )
        return {"vir": vir.value, **level}
    finally:
        await client.close()


# ---- report ---------------------------------------------------------------------------------


def raw_rate(raw: list[dict[str, Any]], batch: int) -> float | None:
    return next((r["tiles_per_s"] for r in raw if r["batch_tiles"] == batch), None)


def level_text(level: dict[str, Any], key: str, spec: str) -> str:
    """One optional figure of a level, formatted with ``spec`` ("-" when unknown)."""
    value = level.get(key)
    return "-" if value is None else format(value, spec)


def stand_in_text(settings: dict[str, Any]) -> str:
    stand_in = settings.get("stand_in_pass_ms")
    if not stand_in:
        return ""
    return f"; a stand-in device: {stand_in[0]:g} ms + {stand_in[1]:g} ms per more tile"


def table(report: dict[str, Any]) -> str:
    lines = [
        f"device: {report['device']} ({report['dtype']}"
        + (", CUDA graphs" if report["settings"].get("cuda_graphs") else "")
        + f"), checkpoint: {report['checkpoint']}"
        + (
            f", median of {report['settings']['rounds']} rounds"
            if report["settings"]["rounds"] > 1
            else ""
        ),
    ]
    if report["raw"]:
        lines += [
            "",
            "| raw batch (tiles) | ms per pass | tiles/s | eager tiles/s |",
            "|---|---|---|---|",
        ]
    for r in report["raw"]:
        lines.append(
            f"| {r['batch_tiles']} | {r['ms_per_pass']:.1f} | {r['tiles_per_s']:.1f} "
            f"| {r.get('eager_tiles_per_s', r['tiles_per_s']):.1f} |"
        )
    stages = report.get("stages")
    if stages:
        device = stand_in_text(report["settings"])
        lines += [
            "",
            f"in process, no gRPC (engine: cut tiles in; pipeline: image bytes in{device})",
            "",
            "| stage | vir | concurrency | tiles/s | x raw | device busy | tiles/pass "
            "| CPU ms/image | p50 ms | p90 ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in stages:
            ratio = f"{s['ratio_to_raw']:.2f}" if s.get("ratio_to_raw") else "-"
            latency = s["latency_ms"]
            lines.append(
                f"| {s['stage']} | {s['vir']} | {s['concurrency']} | {s['tiles_per_s']:.1f} "
                f"| {ratio} | {level_text(s, 'device_busy', '.0%')} "
                f"| {level_text(s, 'tiles_per_pass', '.1f')} "
                f"| {level_text(s, 'cpu_ms_per_image', '.1f')} "
                f"| {latency['p50']:.1f} | {latency['p90']:.1f} |"
            )
    served = report["served"]
    if served:
        settings = report["settings"]
        lines += [
            "",
            f"served: {settings['image_size']} {settings['image_format']} images, "
            f"--max-batch-tiles {settings['max_batch_tiles']}; ratio to raw at that batch, "
            f"and to the best raw batch up to it{stand_in_text(settings)}",
            "",
            "| vir | concurrency | requests | tiles/s | x raw | x best raw | device busy "
            "| tiles/pass | server CPU ms/image | rows in shm | p50 ms | p90 ms | p99 ms "
            "| mean ms | server mean ms | tokens/image |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in served:
            ratio = f"{s['ratio_to_raw']:.2f}" if s.get("ratio_to_raw") else "-"
            best = f"{s['ratio_to_best_raw']:.2f}" if s.get("ratio_to_best_raw") else "-"
            latency = s["latency_ms"]
            lines.append(
                f"| {s['vir']} | {s['concurrency']} | {s['requests']} | {s['tiles_per_s']:.1f} "
                f"| {ratio} | {best} | {level_text(s, 'device_busy', '.0%')} "
                f"| {level_text(s, 'tiles_per_pass', '.1f')} "
                f"| {level_text(s, 'cpu_ms_per_image', '.1f')} "
                f"| {level_text(s, 'shared_memory_share', '.0%')} | {latency['p50']:.0f} "
                f"| {latency['p90']:.0f} | {latency['p99']:.0f} | {latency['mean']:.1f} "
                f"| {level_text(s, 'server_ms_per_call', '.1f')} "
                f"| {s['visual_tokens_per_image']:.0f} |"
            )
        alone = report.get("alone")
        forward_name = "stand-in" if report["settings"].get("stand_in_pass_ms") else "raw"
        if alone:
            lines += [
                "",
                f"one {alone['tiles']}-tile image alone (vir={alone['vir']}, c=1): p50 "
                f"{alone['p50_ms']:.1f} ms; 2 x {forward_name} forward of {alone['tiles']} "
                f"tiles + 10 ms = {alone['budget_ms']:.1f} ms",
            ]
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvd-bench-vision", description=(__doc__ or "").splitlines()[0]
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint folder (default: a preset)")
    source.add_argument(
        "--preset", choices=sorted(PRESETS), default="bench", help="dvd-tiny-model preset"
    )
    parser.add_argument(
        "--flash",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="preset with the Visual Resolution Router (default: yes)",
    )
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where presets are written")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, the server replays CUDA graphs (its default) and raw is timed both "
        "eagerly and from graphs (default: yes)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="timing per batch size")
    parser.add_argument("--raw-min-iters", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--vir", nargs="+", default=["off", "auto"], choices=[m.value for m in VirMode]
    )
    parser.add_argument("--requests", type=int, default=0, help="per level (0: 4 x concurrency)")
    parser.add_argument("--image-size", default="896x896", help="WIDTHxHEIGHT")
    parser.add_argument("--image-format", default="jpeg", choices=["jpeg", "png"])
    parser.add_argument("--max-batch-tiles", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--preprocess-workers",
        type=int,
        default=min(16, os.cpu_count() or 4),
        help="the server's decode and tiling threads (default: one per core, at most 16)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads of the raw encoder and of the server (0: torch's default)",
    )
    parser.add_argument(
        "--server-args", default="", help="more dvd-vision-server flags, as one string"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat raw + served this many times and report the median round of each figure "
        "(for shared machines)",
    )
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--no-raw", action="store_true", help="skip the raw measurement")
    parser.add_argument("--no-served", action="store_true", help="skip the served measurement")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also run the served levels in this process without gRPC: the engine fed cut "
        "tiles, and the pipeline fed image bytes (--server-args do not apply there)",
    )
    parser.add_argument(
        "--overlap-preparation",
        default="auto",
        choices=["auto", "on", "off"],
        help="the server's --overlap-preparation, in the served and in-process levels",
    )
    parser.add_argument(
        "--batch-invariant",
        default="auto",
        choices=["auto", "on", "off"],
        help="the server's --batch-invariant, in the raw, served and in-process levels",
    )
    parser.add_argument(
        "--stand-in-pass-ms",
        type=float,
        nargs=2,
        metavar=("FIRST_TILE", "PER_MORE_TILE"),
        help="serve (and with --stages, run in process) on a stand-in device that takes "
        "FIRST_TILE + PER_MORE_TILE x (n - 1) ms for a pass of n tiles, one pass at a time, "
        "and no host CPU: the levels then measure what the host adds to a device of that "
        "speed (the H100 with CUDA graphs: 3.2 1.8; use with --no-raw)",
    )
    parser.add_argument(
        "--client-shared-memory-mb",
        type=int,
        help="the bench client's shared memory for embeddings (the language service's "
        "--shared-memory-mb; default: room for every concurrent call, at least 256; 0: rows "
        "stream over gRPC)",
    )
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    return parser


def client_shared_memory(
    args: argparse.Namespace, spec: CheckpointSpec, dtype: torch.dtype, concurrency: int
) -> int:
    """The client's shared memory for embeddings: ``--client-shared-memory-mb``, or room for
    every concurrent call's reservation (each reserves the rows of ``max_tiles`` tiles plus a
    thumbnail, as the language service does), so that rows stream only when asked to."""
    if args.client_shared_memory_mb is not None:
        return args.client_shared_memory_mb * 1024 * 1024
    rows = (spec.max_tiles + int(spec.use_thumbnail)) * spec.tokens_per_tile
    per_call = rows * spec.llm_hidden_size * dtype.itemsize
    return max(256 * 1024 * 1024, concurrency * per_call)


def median_of_rounds(rounds: list[list[dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    """Per entry (same position in every round), the round with the median ``key``."""
    merged = []
    for entries in zip(*rounds, strict=True):
        ordered = sorted(entries, key=lambda entry: entry[key])
        merged.append(dict(ordered[(len(ordered) - 1) // 2], rounds=len(entries)))
    return merged


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    path = checkpoint_path(args)
    spec = load_checkpoint_spec(path)
    device = resolve_device(args.device)
    dtype = compute_dtype_for_device(args.dtype, device)
    width, height = parse_size(args.image_size)
    grid = plan_tiles(width, height, min_tiles=spec.min_tiles, max_tiles=spec.max_tiles)
    tiles_per_image = grid.num_tiles
    batch_sizes = sorted({*args.batch_sizes, args.max_batch_tiles, tiles_per_image})
    chunk = chunk_tiles(args.batch_invariant, device)

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["dvd-bench-vision", *(sys.argv[1:] if argv is None else argv)]),
        "checkpoint": args.model or f"preset {args.preset}{' (Flash)' if args.flash else ''}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()[0],
        },
        "settings": {
            "max_batch_tiles": args.max_batch_tiles,
            "max_wait_ms": args.max_wait_ms,
            "preprocess_workers": args.preprocess_workers,
            "image_size": f"{width}x{height}",
            "image_format": args.image_format,
            "tiles_per_image": tiles_per_image,
            "rounds": args.rounds,
            "cuda_graphs": args.cuda_graphs and device.type == "cuda",
            "torch_threads": args.torch_threads or torch.get_num_threads(),
            "overlap_preparation": args.overlap_preparation,
            "batch_invariant_chunk_tiles": chunk,
            "stand_in_pass_ms": args.stand_in_pass_ms,
        },
        "raw": [],
        "stages": [],
        "served": [],
    }
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if chunk and device.type == "cuda":
        use_deterministic_cuda_kernels()
    raw = None if args.no_raw else RawEncoder(spec, device, dtype, args.cuda_graphs, chunk)
    modes = [VirMode(v) for v in args.vir if spec.flash is not None or v == "off"]
    image = synthetic_image(width, height, args.image_format)
    server_args = [
        "--device",
        str(device),
        "--dtype",
        args.dtype,
        "--max-batch-tiles",
        str(args.max_batch_tiles),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--preprocess-workers",
        str(args.preprocess_workers),
        "--max-queued-tiles",
        "1000000",
        # The same image every call: without this the embedding cache would answer them.
        "--embedding-cache-mb",
        "0",
        "--torch-threads",
        str(args.torch_threads),
        "--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs",
        "--overlap-preparation",
        args.overlap_preparation,
        "--batch-invariant",
        args.batch_invariant,
        *shlex.split(args.server_args),
    ]

    def requests_for(concurrency: int) -> int:
        return args.requests or max(8, 4 * concurrency)

    if args.stages:
        report["stages"] = measure_stages(
            path,
            device,
            {
                "dtype": args.dtype,
                "max_batch_tiles": args.max_batch_tiles,
                "max_wait_ms": args.max_wait_ms,
                "preprocess_workers": args.preprocess_workers,
                "max_queued_tiles": 1_000_000,
                "embedding_cache_mb": 0,
                "torch_threads": args.torch_threads,
                "cuda_graphs": args.cuda_graphs,
                "overlap_preparation": args.overlap_preparation,
                "batch_invariant": args.batch_invariant,
            },
            image,
            modes,
            args.concurrency,
            requests_for,
            args.stand_in_pass_ms,
        )
    raw_rounds: list[list[dict[str, Any]]] = []
    served_rounds: list[list[dict[str, Any]]] = []

    def one_round(server: tuple[str, str] | None) -> None:
        """Raw, then served, back to back: on a shared machine both see the same load."""
        if raw is not None:
            raw_rounds.append([])
            for batch in batch_sizes:
                raw_rounds[-1].append(raw.measure(batch, args.raw_seconds, args.raw_min_iters))
                rate = raw_rounds[-1][-1]["tiles_per_s"]
                print(f"raw batch {batch}: {rate:.1f} tiles/s", file=sys.stderr, flush=True)
        if server is None:
            return
        target, metrics_url = server
        reference = raw_rate(raw_rounds[-1], args.max_batch_tiles) if raw_rounds else None
        # The encoder's best rate at any batch the server may run (on a CPU, smaller batches
        # can be faster per tile than the cap).
        best = (
            max(
                (
                    r["tiles_per_s"]
                    for r in raw_rounds[-1]
                    if r["batch_tiles"] <= args.max_batch_tiles
                ),
                default=None,
            )
            if raw_rounds
            else None
        )
        served_rounds.append([])
        for mode in modes:
            for concurrency in args.concurrency:
                level = asyncio.run(
                    measure_served(
                        metrics_url,
                        target,
                        spec.llm_hidden_size,
                        image,
                        mode,
                        concurrency,
                        requests_for(concurrency),
                        client_shared_memory(args, spec, dtype, concurrency),
                    )
                )
                level["ratio_to_raw"] = level["tiles_per_s"] / reference if reference else None
                level["ratio_to_best_raw"] = level["tiles_per_s"] / best if best else None
                served_rounds[-1].append(level)
                print(
                    f"served vir={mode.value} c={concurrency}: {level['tiles_per_s']:.1f} tiles/s",
                    file=sys.stderr,
                    flush=True,
                )

    if args.no_served:
        for _ in range(args.rounds):
            one_round(None)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            log = Path(scratch) / "vision-server.log"
            with vision_server(
                path, server_args, log, args.start_timeout, args.stand_in_pass_ms
            ) as server:
                for _ in range(args.rounds):
                    one_round(server)
    if raw_rounds:
        report["raw"] = median_of_rounds(raw_rounds, "tiles_per_s")
        reference = raw_rate(report["raw"], args.max_batch_tiles)
        for level in report["stages"]:
            level["ratio_to_raw"] = level["tiles_per_s"] / reference if reference else None
    if served_rounds:
        report["served"] = median_of_rounds(served_rounds, "ratio_to_raw" if raw else "tiles_per_s")
    if args.rounds > 1:
        report["rounds"] = {"raw": raw_rounds, "served": served_rounds}
    alone = next((s for s in report["served"] if s["concurrency"] == 1), None)
    forward = next((r for r in report["raw"] if r["batch_tiles"] == tiles_per_image), None)
    forward_ms = forward["ms_per_pass"] if forward else None
    if args.stand_in_pass_ms is not None:  # the image's pass on the stand-in device
        first_ms, per_more_ms = args.stand_in_pass_ms
        forward_ms = first_ms + per_more_ms * (tiles_per_image - 1)
    if alone and forward_ms is not None:
        report["alone"] = {
            "vir": alone["vir"],
            "tiles": tiles_per_image,
            "p50_ms": alone["latency_ms"]["p50"],
            "raw_forward_ms": forward_ms,
            "budget_ms": 2 * forward_ms + 10,
        }
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()

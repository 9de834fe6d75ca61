"""The vision engine: one encoder model fed by the tile batcher, its device data path, and
per-request routing.

The gRPC layer hands it prepared images and gets embeddings back; it knows nothing of gRPC.

One pass on a GPU (the batcher launches it on one thread and waits for it on another):

- host: the pass's uint8 tiles are gathered into one pinned buffer;
- copy-in stream: host to device, overlapping the previous pass's compute;
- compute stream: normalisation, InternViT, pixel shuffle, ``mlp1`` (and on Flash checkpoints
  ``mlp2`` and the router's p0);
- copy-out stream: back into pinned host memory, only what each image will send: the
  256-token rows (``vir`` off, or no router), the 64-token rows (``vir`` max), or only p0
  (``vir`` auto: the rows wait on the device until the whole request is routed, then only the
  chosen ones are copied back);
- an event marks the end; the waiting thread, never the event loop, blocks on it.

On the CPU the same steps run without streams, pinned memory or events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protos.messages import RowSelection
from protos.options import VirMode
from protos.tiling import TileGrid
from vision_server import metrics
from vision_server.batching import (
    BatchStats,
    PassSlice,
    TileBatcher,
    is_fatal,
    pass_error,
)
from vision_server.cuda_graphs import GraphedForward, capture
from vision_server.invariance import chunked
from vision_server.model.encoder import TileEmbeddings, TileNormaliser, VisionEncoder
from vision_server.preprocess import PreparedImage
from vision_server.routing import applied_mode, route_tiles, thresholds
from vision_server.threads import started_pool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedImage:
    embeddings: torch.Tensor  # [num_visual_tokens, llm_hidden], on the host, engine dtype
    tokens_per_tile: list[int]
    grid: TileGrid
    stats: BatchStats
    vir_mode: VirMode | None  # None: the checkpoint has no router
    from_cache: bool = False  # served by the embedding cache, not encoded for this request

    @property
    def num_visual_tokens(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class TileParts:
    """An image still being cut: its tiles in parts, in tile order (the grid, then the
    thumbnail), each ready when its awaitable is. Each part is encoded as soon as it is
    ready, so a lone image's grid is on the device while its thumbnail is still resized."""

    parts: Sequence[Awaitable[torch.Tensor]]  # [k, 3, H, W] uint8 each, on the host
    grid: TileGrid

    @property
    def num_tiles(self) -> int:
        return self.grid.num_tiles


@dataclass
class SliceOutput:
    """One image's share of one finished pass."""

    rows: torch.Tensor | None = None  # [k, tokens, hidden] on the host (FULL, COMPRESSED)
    # ROUTED: both kinds of rows, still on the device, and p0 on the host.
    full: torch.Tensor | None = None  # [k, 256, hidden]
    compressed: torch.Tensor | None = None  # [k, 64, hidden]
    compress_prob: torch.Tensor | None = None  # [k], the compute dtype


class _LaunchedPass:
    """A pass queued on the device; ``wait`` blocks (on the batcher's wait thread) until done."""

    def __init__(
        self,
        outputs: list[SliceOutput],
        done: torch.cuda.Event | None = None,
        device_outputs: TileEmbeddings | None = None,
        compute: tuple[torch.cuda.Event, torch.cuda.Event] | None = None,
    ) -> None:
        self._outputs = outputs
        self._done = done
        self._compute = compute  # the forward's start and end on the compute stream
        # The copies out read these; they must not be freed (and their memory reused by the
        # next pass) before the copies are done.
        self._device_outputs = device_outputs

    def wait(self) -> list[SliceOutput]:
        if self._done is not None:
            self._done.synchronize()
        if self._compute is not None:
            started, finished = self._compute
            metrics.device_busy_seconds.inc(started.elapsed_time(finished) / 1000)
        self._device_outputs = None
        return self._outputs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available")
    return device


def compute_dtype_for_device(name: str, device: torch.device) -> torch.dtype:
    """The ViT's compute dtype: ``auto`` is bfloat16 on CUDA and float32 elsewhere, whatever
    the checkpoint was saved in (the language service follows the checkpoint instead)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class _Streams:
    """CUDA streams of the data path (None on the CPU, where everything is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_in = torch.cuda.Stream(device)
            self.compute = torch.cuda.Stream(device)
            self.copy_out = torch.cuda.Stream(device)
            self.copy_back = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def on(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        """Make ``stream`` (and its device) current in this thread."""
        if stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            yield

    def host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor to copy to or from the device asynchronously (pinned on CUDA)."""
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=self.cuda)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` back on the current stream, into pinned memory, and wait for it
        (on the calling thread)."""
        if not self.cuda:
            return tensor
        host = self.host_empty(tensor.shape, tensor.dtype)
        host.copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        copied.synchronize()
        return host


class EncoderEngine:
    """Runs the vision encoder over batched tiles and assembles per-image embeddings."""

    def __init__(
        self,
        encoder: VisionEncoder,
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_batch_tiles: int,
        max_wait_ms: float,
        max_queued_tiles: int,
        passes_in_flight: int = 2,
        max_queued_bytes: int = 1 << 40,
        on_fatal: Callable[[BaseException], None] | None = None,
        invariant_chunk_tiles: int = 0,
    ) -> None:
        self.encoder = encoder
        self.spec = encoder.spec
        self.device = device
        self.dtype = dtype
        self.hidden_size = encoder.spec.llm_hidden_size
        self._streams = _Streams(device)
        self._normalise = TileNormaliser(self.spec.image_mean, self.spec.image_std, device)
        # Batch invariance (vision_server.invariance): every pass in chunks of one fixed shape.
        self.invariant_chunk_tiles = invariant_chunk_tiles
        self._eager_forward = (
            chunked(self._encode, invariant_chunk_tiles) if invariant_chunk_tiles else self._encode
        )
        self.batcher: TileBatcher[SliceOutput] = TileBatcher(
            self.run_pass,
            max_batch_tiles=max_batch_tiles,
            max_wait_ms=max_wait_ms,
            max_inflight=passes_in_flight,
            max_queued_tiles=max_queued_tiles,
            max_queued_bytes=max_queued_bytes,
            on_pass=metrics.observe_pass,
            on_fatal=on_fatal,
        )
        self._graphs: GraphedForward | None = None
        # Assembling images and copying routed rows back: off the event loop, and not behind
        # the next pass on the launch thread.
        self._copy_back = started_pool(2, "copy-back")
        # Read at scrape time, so the gauge is exact without bookkeeping on the hot path.
        metrics.queued_tiles.set_function(lambda: self.batcher.queued_tiles)

    @property
    def has_router(self) -> bool:
        return self.encoder.has_router

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing on the device: tiles submitted now start a pass at once."""
        return self.batcher.idle

    @property
    def failure(self) -> BaseException | None:
        """Why the engine stopped serving for good (None while it serves)."""
        return self.batcher.failure

    def set_fatal_handler(self, handler: Callable[[BaseException], None]) -> None:
        """Called (on the event loop) once, if the engine can no longer serve."""
        self.batcher.on_fatal = handler

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs is not None

    def capture_cuda_graphs(self) -> None:
        """Capture the forward as CUDA graphs for passes up to the batch cap (CUDA only; on
        failure passes stay eager). Call before serving."""
        if not self._streams.cuda:
            return
        size = self.spec.vision.image_size
        self._graphs = capture(
            self._eager_forward,
            self.device,
            (3, size, size),
            self.batcher.max_batch_tiles,
            self.invariant_chunk_tiles,
        )

    def _encode(self, tiles: torch.Tensor) -> TileEmbeddings:
        return self.encoder(self._normalise(tiles, self.dtype))

    # ---- one pass (launch thread) -----------------------------------------------------------

    def run_pass(self, slices: Sequence[PassSlice]) -> _LaunchedPass:
        """Queue one forward pass over ``slices`` (uint8 tiles on the host); on the CPU it has
        run when this returns."""
        streams = self._streams
        with torch.inference_mode():
            if not streams.cuda:
                tiles = self._gather(slices)
                started = time.perf_counter()
                out = self._eager_forward(tiles)
                metrics.device_busy_seconds.inc(time.perf_counter() - started)
                return _LaunchedPass(self._slice_outputs(out, slices))
            # [n, 3, H, W] uint8 in pinned memory, then to the device on the copy-in stream.
            staging = self._gather(slices)
            with torch.cuda.device(self.device):
                with streams.on(streams.copy_in):
                    tiles = staging.to(self.device, non_blocking=True)
                streams.compute.wait_stream(streams.copy_in)
                with streams.on(streams.compute):
                    tiles.record_stream(streams.compute)  # allocated on copy-in, used here
                    compute = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    compute[0].record()
                    forward = self._graphs or self._eager_forward
                    out = forward(tiles)
                    compute[1].record()
                streams.copy_out.wait_stream(streams.compute)
                with streams.on(streams.copy_out):
                    outputs = self._slice_outputs(out, slices)
                    done = torch.cuda.Event()
                    done.record()
            return _LaunchedPass(outputs, done, out, compute)

    def _gather(self, slices: Sequence[PassSlice]) -> torch.Tensor:
        if len(slices) == 1 and not self._streams.cuda:
            return slices[0].tiles
        count = sum(int(s.tiles.shape[0]) for s in slices)
        staging = self._streams.host_empty((count, *slices[0].tiles.shape[1:]), torch.uint8)
        # numpy copies on this thread without the GIL; torch.cat would wake its intra-op
        # threads, which costs more than the copy (see codec.copy_bytes).
        np.concatenate([s.tiles.numpy() for s in slices], out=staging.numpy())
        return staging

    def _copy_out(self, rows: torch.Tensor) -> torch.Tensor:
        """Start copying ``rows`` to the host (on CUDA; on the CPU they are there already)."""
        if not self._streams.cuda:
            return rows
        host = self._streams.host_empty(rows.shape, rows.dtype)
        host.copy_(rows, non_blocking=True)
        return host

    def _slice_outputs(self, out: TileEmbeddings, slices: Sequence[PassSlice]) -> list[SliceOutput]:
        outputs: list[SliceOutput] = []
        start = 0
        for piece in slices:
            end = start + int(piece.tiles.shape[0])
            if piece.want is RowSelection.FULL:
                outputs.append(SliceOutput(rows=self._copy_out(out.full[start:end])))
            elif out.compressed is None or out.compress_prob is None:
                raise RuntimeError("this checkpoint has no Visual Resolution Router")
            elif piece.want is RowSelection.COMPRESSED:
                outputs.append(SliceOutput(rows=self._copy_out(out.compressed[start:end])))
            else:
                outputs.append(
                    SliceOutput(
                        full=out.full[start:end],
                        compressed=out.compressed[start:end],
                        compress_prob=self._copy_out(out.compress_prob[start:end]),
                    )
                )
            start = end
        return outputs

    # ---- one image's rows (copy-back threads) -----------------------------------------------

    def _assemble(self, parts: list[SliceOutput], compress: list[bool] | None) -> torch.Tensor:
        """An image's rows on the host, ``[num_visual_tokens, hidden]``: as copied out by its
        passes, or (``compress`` given) chosen per tile on the device and copied back now."""
        with torch.inference_mode():
            if compress is None:
                blocks = [p.rows for p in parts if p.rows is not None]
                rows = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
                return rows.reshape(-1, self.hidden_size)
            streams = self._streams
            with streams.on(streams.copy_back if streams.cuda else None):
                full = [p.full for p in parts if p.full is not None]
                compressed = [p.compressed for p in parts if p.compressed is not None]
                full_t = full[0] if len(full) == 1 else torch.cat(full)
                compressed_t = compressed[0] if len(compressed) == 1 else torch.cat(compressed)
                per_tile = [compressed_t[i] if c else full_t[i] for i, c in enumerate(compress)]
                chosen = torch.cat(per_tile)  # [num_visual_tokens, hidden] on the device
                return streams.to_host(chosen)

    async def _assemble_off_loop(
        self, parts: list[SliceOutput], compress: list[bool] | None
    ) -> torch.Tensor:
        if compress is None and len(parts) == 1 and parts[0].rows is not None:
            # One block of rows, already on the host: nothing to copy, so no thread hop.
            return parts[0].rows.reshape(-1, self.hidden_size)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._copy_back, self._assemble, parts, compress)
        except Exception as exc:
            logger.error("copying an image's rows back failed", exc_info=exc)
            if is_fatal(exc):
                self.batcher.die(exc)
            tiles = sum(int(p.full.shape[0]) for p in parts if p.full is not None)
            raise pass_error(exc, tiles or len(parts)) from exc

    # ---- lifecycle --------------------------------------------------------------------------

    def warmup(self) -> None:
        """One pass (and one routed copy back) so the first request does not pay for lazy
        initialisation."""
        size = self.spec.vision.image_size
        tiles = torch.zeros(1, 3, size, size, dtype=torch.uint8)
        wants: list[Any] = [RowSelection.FULL]
        if self.has_router:
            wants.append(RowSelection.ROUTED)
        for want in wants:
            parts = self.run_pass([PassSlice(tiles, want)]).wait()
            self._assemble(parts, [False] if want is RowSelection.ROUTED else None)

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._copy_back.shutdown(wait=self.failure is None, cancel_futures=True)

    # ---- requests ---------------------------------------------------------------------------

    async def _submit(
        self, image: PreparedImage | TileParts, selection: RowSelection, request_id: str
    ) -> tuple[list[SliceOutput], BatchStats]:
        """One image's pieces, in tile order, and its stats; a ``TileParts`` image is
        submitted part by part, each as soon as it is cut."""
        if isinstance(image, PreparedImage):
            return await self.batcher.submit(image.tiles, selection, request_id)

        async def part_of(cut: Awaitable[torch.Tensor]) -> tuple[list[SliceOutput], BatchStats]:
            return await self.batcher.submit(await cut, selection, request_id)

        parts = [asyncio.ensure_future(part_of(cut)) for cut in image.parts]
        try:
            done = await asyncio.gather(*parts)
        finally:
            for part in parts:  # one part failed, or the caller is gone: drop the others
                part.cancel()
        pieces = [piece for part_pieces, _ in done for piece in part_pieces]
        stats = BatchStats(
            queue_ms=min(part_stats.queue_ms for _, part_stats in done),
            encode_ms=sum(part_stats.encode_ms for _, part_stats in done),
        )
        return pieces, stats

    async def encode_request(
        self,
        images: Sequence[PreparedImage | TileParts],
        request_id: str = "",
        vir_mode: VirMode = VirMode.AUTO,
        absolute_threshold: float | None = None,
    ) -> AsyncGenerator[EncodedImage, None]:
        """Embeddings of one request's images, in order: each tile's 256 rows, or 64 where
        routed. Under ``vir`` auto the router decides over all tiles of the request, so the
        first image comes once every image is encoded; otherwise each as soon as it is done."""
        if self.failure is not None:
            raise self.failure
        applied = applied_mode(vir_mode, self.has_router)
        selection = RowSelection.for_mode(applied)
        # All images queue at once so they can share forward passes; results come in order.
        tasks = [
            asyncio.create_task(self._submit(image, selection, request_id)) for image in images
        ]
        copies: list[asyncio.Task[torch.Tensor]] = []
        try:
            if selection is RowSelection.ROUTED:
                encoded = [await task for task in tasks]
                routes = self._route(encoded, absolute_threshold)
                copies = [
                    asyncio.create_task(self._assemble_off_loop(parts, route))
                    for (parts, _), route in zip(encoded, routes, strict=True)
                ]
                for image, (_, stats), route, copy in zip(
                    images, encoded, routes, copies, strict=True
                ):
                    yield self._encoded(image, await copy, route, stats, applied)
            else:
                squeeze = selection is RowSelection.COMPRESSED
                for image, task in zip(images, tasks, strict=True):
                    parts, stats = await task
                    embeddings = await self._assemble_off_loop(parts, None)
                    yield self._encoded(
                        image, embeddings, [squeeze] * image.num_tiles, stats, applied
                    )
        finally:
            for task in tasks:
                task.cancel()
            for copy in copies:
                copy.cancel()

    def _route(
        self, encoded: list[tuple[list[SliceOutput], BatchStats]], absolute_threshold: float | None
    ) -> list[list[bool]]:
        """The router's decision for every tile of the request, split per image."""
        flash = self.spec.flash
        assert flash is not None  # ROUTED is only chosen when the checkpoint has a router
        per_image = [
            torch.cat([p.compress_prob for p in parts if p.compress_prob is not None])
            for parts, _ in encoded
        ]
        relative, absolute = thresholds(flash, absolute_threshold)
        decisions = route_tiles(torch.cat(per_image), VirMode.AUTO, relative, absolute)
        routes, start = [], 0
        for p0 in per_image:
            routes.append(decisions[start : start + len(p0)])
            start += len(p0)
        return routes

    def _encoded(
        self,
        image: PreparedImage | TileParts,
        embeddings: torch.Tensor,
        compress: list[bool],
        stats: BatchStats,
        applied: VirMode | None,
    ) -> EncodedImage:
        full, small = self.spec.tokens_per_tile, self.spec.compressed_tokens_per_tile
        tokens = [small if squeeze else full for squeeze in compress]
        metrics.observe_routing(tokens, full, small)
        return EncodedImage(embeddings, tokens, image.grid, stats, applied)

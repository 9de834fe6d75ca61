"""The vision engine: requests in, per-image embeddings out. Each request's images are
queued on the tile batcher (which shares forward passes between requests), routed together
under ``vir`` auto, and put back together image by image.

The gRPC layer hands it prepared images and gets embeddings back; it knows nothing of gRPC.
What one pass does on the device (streams, pinned staging, CUDA graphs) is
``vision_server.data_path``'s business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from protos.messages import RowSelection
from protos.options import VirMode
from protos.tiling import TileGrid
from vision_server import metrics, tracing
from vision_server.batching import (
    BatchStats,
    PassSlice,
    TileBatcher,
    is_fatal,
    pass_error,
)
from vision_server.data_path import DataPath, LaunchedPass, SliceOutput
from vision_server.model.encoder import VisionEncoder
from vision_server.preprocess import PreparedImage
from vision_server.routing import (
    TokenBudget,
    applied_mode,
    route_request,
    shaping_budget,
    thresholds,
)
from vision_server.threads import started_pool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedItem:
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
        self.data_path = DataPath(
            encoder, device, dtype, invariant_chunk_tiles=invariant_chunk_tiles
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
        return self.data_path.graphs is not None

    def capture_cuda_graphs(self) -> None:
        """Capture the forward as CUDA graphs for passes up to the batch cap (CUDA only; on
        failure passes stay eager). Call before serving."""
        self.data_path.capture_cuda_graphs(self.batcher.max_batch_tiles)

    def run_pass(self, slices: Sequence[PassSlice]) -> LaunchedPass:
        """The batcher's pass: one forward over ``slices`` on the data path."""
        return self.data_path.run_pass(slices)

    # ---- one image's rows -------------------------------------------------------------------

    async def _assemble_off_loop(
        self, parts: list[SliceOutput], compress: list[bool] | None
    ) -> torch.Tensor:
        if compress is None and len(parts) == 1 and parts[0].rows is not None:
            # One block of rows, already on the host: nothing to copy, so no thread hop.
            return parts[0].rows.reshape(-1, self.hidden_size)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._copy_back, self.data_path.assemble, parts, compress
            )
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
            self.data_path.assemble(parts, [False] if want is RowSelection.ROUTED else None)

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
            enqueued_at=min(part_stats.enqueued_at for _, part_stats in done),
            first_pass_at=min(part_stats.first_pass_at for _, part_stats in done),
            passes=tuple(record for _, part_stats in done for record in part_stats.passes),
        )
        return pieces, stats

    async def encode_request(
        self,
        images: Sequence[PreparedImage | TileParts],
        request_id: str = "",
        vir_mode: VirMode = VirMode.AUTO,
        absolute_threshold: float | None = None,
        budget: TokenBudget | None = None,
    ) -> AsyncGenerator[EncodedItem, None]:
        """Embeddings of one request's images, in order: each tile's 256 rows, or 64 where
        routed. Under ``vir`` auto the router decides over all tiles of the request, so the
        first image comes once every image is encoded; otherwise each as soon as it is done.
        ``budget`` (checked: ``routing.check_budget``) caps the request's visual tokens."""
        if self.failure is not None:
            raise self.failure
        applied = applied_mode(vir_mode, self.has_router)
        budget = shaping_budget(budget or TokenBudget(), applied)
        selection = RowSelection.for_mode(applied, budget is not None)
        # All images queue at once so they can share forward passes; results come in order.
        tasks = [
            asyncio.create_task(self._submit(image, selection, request_id)) for image in images
        ]
        copies: list[asyncio.Task[torch.Tensor]] = []
        try:
            if selection is RowSelection.ROUTED:
                encoded = [await task for task in tasks]
                assert applied is not None  # ROUTED needs a router
                tiles = sum(image.num_tiles for image in images)
                with tracing.span("vision.route", {"dvd.tiles": tiles}) as route_span:
                    routes = self._route(encoded, applied, absolute_threshold, budget)
                    if route_span is not None:
                        compressed = sum(sum(route) for route in routes)
                        route_span.set_attribute("dvd.compressed_tiles", compressed)
                        route_span.set_attribute("dvd.vir", applied.value)
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
        self,
        encoded: list[tuple[list[SliceOutput], BatchStats]],
        applied: VirMode,
        absolute_threshold: float | None,
        budget: TokenBudget | None,
    ) -> list[list[bool]]:
        """The decision for every tile of the request (the budget's and, under ``auto``, the
        router's rule), split per image."""
        flash = self.spec.flash
        assert flash is not None  # ROUTED is only chosen when the checkpoint has a router
        per_image = [
            torch.cat([p.compress_prob for p in parts if p.compress_prob is not None])
            for parts, _ in encoded
        ]
        relative, absolute = thresholds(flash, absolute_threshold)
        spec = self.spec
        return route_request(
            per_image,
            applied,
            relative,
            absolute,
            budget,
            spec.tokens_per_tile,
            spec.compressed_tokens_per_tile,
        )

    def _encoded(
        self,
        image: PreparedImage | TileParts,
        embeddings: torch.Tensor,
        compress: list[bool],
        stats: BatchStats,
        applied: VirMode | None,
    ) -> EncodedItem:
        full, small = self.spec.tokens_per_tile, self.spec.compressed_tokens_per_tile
        tokens = [small if squeeze else full for squeeze in compress]
        metrics.observe_routing(tokens, full, small)
        return EncodedItem(embeddings, tokens, image.grid, stats, applied)

"""The encoder's forward pass captured as CUDA graphs, one per batch size of a fixed set.

Eager PyTorch launches every kernel of InternViT from Python, one by one: hundreds per pass.
In the service that thread shares the GIL with decoding, tiling and gRPC, so under load the
device waits for launches (it looks busy from start to end of a pass, but runs slower than the
same pass alone), and a small pass costs its launch time whatever its size. A replayed graph is
one launch.

A pass of ``n`` tiles replays the graph of the smallest captured size ``>= n``, with the
surplus rows of its input left as they were: tiles do not interact in the encoder, so those
rows change nothing in the first ``n`` outputs. Outputs are copied out of the graph's own
buffers (a device-to-device copy, microseconds) so that the next replay cannot overwrite rows
that are still waiting to be routed or copied back. Bigger passes than the largest size run
eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vision_server.model.encoder import TileEmbeddings

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], TileEmbeddings]  # uint8 tiles on the device -> embeddings


def graph_batch_sizes(max_batch_tiles: int, chunk_tiles: int = 0) -> list[int]:
    """Every size up to 8, then every multiple of 4 up to ``max_batch_tiles`` (and that cap
    itself): a pass computes at most 3 padding tiles, and none when it is small, where one
    tile more costs the most latency (one 5-tile image padded to 8 took 1.5x as long on an
    H100). With batch invariance (``chunk_tiles``), every multiple of the chunk up to the
    cap: those are the only shapes the encoder computes."""
    if chunk_tiles:
        top = -(-max_batch_tiles // chunk_tiles) * chunk_tiles
        return list(range(chunk_tiles, top + 1, chunk_tiles))
    sizes = set(range(1, min(8, max_batch_tiles) + 1))
    sizes.update(range(12, max_batch_tiles + 1, 4))
    sizes.add(max_batch_tiles)
    return sorted(sizes)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tiles: torch.Tensor  # the graph's input: [size, 3, H, W] uint8
    out: TileEmbeddings  # the graph's outputs, overwritten by every replay


class GraphedForward:
    """``forward`` (uint8 tiles on the device -> embeddings) replayed from CUDA graphs."""

    def __init__(
        self,
        forward: Forward,
        device: torch.device,
        tile_shape: Sequence[int],
        batch_sizes: Sequence[int],
    ) -> None:
        self._forward = forward
        self._captured: dict[int, _Captured] = {}
        self.batch_sizes = sorted(set(batch_sizes))
        pool = None
        # The largest first: the others then fit in the memory pool it leaves (one pool for
        # all, since replays never overlap: they all run on the compute stream).
        with torch.inference_mode(), torch.cuda.device(device):
            for size in reversed(self.batch_sizes):
                tiles = torch.zeros((size, *tile_shape), dtype=torch.uint8, device=device)
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, autotune)
                    for _ in range(2):
                        forward(tiles)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    out = forward(tiles)
                pool = graph.pool()
                self._captured[size] = _Captured(graph, tiles, out)
            torch.cuda.synchronize(device)

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def graph_size(self, tiles: int) -> int | None:
        """The captured batch size a pass of ``tiles`` replays (None: it runs eagerly)."""
        return next((size for size in self.batch_sizes if size >= tiles), None)

    def __call__(self, tiles: torch.Tensor) -> TileEmbeddings:
        """On the current stream: fresh output tensors, as the eager forward gives."""
        count = int(tiles.shape[0])
        size = self.graph_size(count)
        if size is None:
            return self._forward(tiles)
        captured = self._captured[size]
        captured.tiles[:count].copy_(tiles)
        captured.graph.replay()
        out = captured.out

        def rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[:count].clone()

        full = rows(out.full)
        assert full is not None
        return TileEmbeddings(full, rows(out.compressed), rows(out.compress_prob))


def capture(
    forward: Forward,
    device: torch.device,
    tile_shape: Sequence[int],
    max_batch_tiles: int,
    chunk_tiles: int = 0,
) -> GraphedForward | None:
    """Graphs for every size up to ``max_batch_tiles``; None (eager passes, with a warning)
    when capture fails, since a slower service beats one that does not start."""
    sizes = graph_batch_sizes(max_batch_tiles, chunk_tiles)
    started = time.perf_counter()
    try:
        graphed = GraphedForward(forward, device, tile_shape, sizes)
    except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
        logger.warning("CUDA graph capture failed; forward passes run eagerly: %r", exc)
        torch.cuda.empty_cache()
        return None
    logger.info(
        "CUDA graphs captured for passes of %s tiles in %.1f s",
        ", ".join(map(str, sizes)),
        time.perf_counter() - started,
    )
    return graphed

"""The vision encoder's device data path: one forward pass over a batch of tiles, from uint8
tiles on the host to embedding rows back on the host. It knows nothing of requests; the
engine (``vision_server.engine``) decides what a pass carries and puts each image together.

One pass on a GPU (the batcher launches it on one thread and waits for it on another):

- host: the pass's uint8 tiles are gathered into one pinned buffer;
- copy-in stream: host to device, overlapping the previous pass's compute;
- compute stream: normalisation, InternViT, pixel shuffle, ``mlp1`` (and on Flash checkpoints
  ``mlp2`` and the router's p0), replayed from CUDA graphs where captured;
- copy-out stream: back into pinned host memory, only what each image will send: the
  256-token rows (``vir`` off, or no router), the 64-token rows (``vir`` max), or only p0
  (``vir`` auto: the rows wait on the device until the whole request is routed, then only the
  chosen ones are copied back, on the copy-back stream);
- an event marks the end; the waiting thread, never the event loop, blocks on it.

On the CPU the same steps run without streams, pinned memory or events.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protos.messages import RowSelection
from vision_server import metrics
from vision_server.batching import PassSlice
from vision_server.cuda_graphs import GraphedForward, capture
from vision_server.invariance import chunked
from vision_server.model.encoder import TileEmbeddings, TileNormaliser, VisionEncoder


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


@dataclass
class SliceOutput:
    """One image's share of one finished pass."""

    rows: torch.Tensor | None = None  # [k, tokens, hidden] on the host (FULL, COMPRESSED)
    # ROUTED: both kinds of rows, still on the device, and p0 on the host.
    full: torch.Tensor | None = None  # [k, 256, hidden]
    compressed: torch.Tensor | None = None  # [k, 64, hidden]
    compress_prob: torch.Tensor | None = None  # [k], the compute dtype


class LaunchedPass:
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


class Streams:
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


class DataPath:
    """Runs the vision encoder over one pass of tiles, and copies an image's chosen rows back."""

    def __init__(
        self,
        encoder: VisionEncoder,
        device: torch.device,
        dtype: torch.dtype,
        *,
        invariant_chunk_tiles: int = 0,
    ) -> None:
        self.encoder = encoder
        self.spec = encoder.spec
        self.device = device
        self.dtype = dtype
        self.hidden_size = encoder.spec.llm_hidden_size
        self.streams = Streams(device)
        self._normalise = TileNormaliser(self.spec.image_mean, self.spec.image_std, device)
        # Batch invariance (vision_server.invariance): every pass in chunks of one fixed shape.
        self.invariant_chunk_tiles = invariant_chunk_tiles
        self.eager_forward = (
            chunked(self._encode, invariant_chunk_tiles) if invariant_chunk_tiles else self._encode
        )
        self.graphs: GraphedForward | None = None

    def capture_cuda_graphs(self, max_batch_tiles: int) -> None:
        """Capture the forward as CUDA graphs for passes up to ``max_batch_tiles`` (CUDA only;
        on failure passes stay eager)."""
        if not self.streams.cuda:
            return
        size = self.spec.vision.image_size
        self.graphs = capture(
            self.eager_forward,
            self.device,
            (3, size, size),
            max_batch_tiles,
            self.invariant_chunk_tiles,
        )

    def _encode(self, tiles: torch.Tensor) -> TileEmbeddings:
        return self.encoder(self._normalise(tiles, self.dtype))

    # ---- one pass (launch thread) -----------------------------------------------------------

    def run_pass(self, slices: Sequence[PassSlice]) -> LaunchedPass:
        """Queue one forward pass over ``slices`` (uint8 tiles on the host); on the CPU it has
        run when this returns."""
        streams = self.streams
        with torch.inference_mode():
            if not streams.cuda:
                tiles = self._gather(slices)
                started = time.perf_counter()
                out = self.eager_forward(tiles)
                metrics.device_busy_seconds.inc(time.perf_counter() - started)
                return LaunchedPass(self._slice_outputs(out, slices))
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
                    forward = self.graphs or self.eager_forward
                    out = forward(tiles)
                    compute[1].record()
                streams.copy_out.wait_stream(streams.compute)
                with streams.on(streams.copy_out):
                    outputs = self._slice_outputs(out, slices)
                    done = torch.cuda.Event()
                    done.record()
            return LaunchedPass(outputs, done, out, compute)

    def _gather(self, slices: Sequence[PassSlice]) -> torch.Tensor:
        if len(slices) == 1 and not self.streams.cuda:
            return slices[0].tiles
        count = sum(int(s.tiles.shape[0]) for s in slices)
        staging = self.streams.host_empty((count, *slices[0].tiles.shape[1:]), torch.uint8)
        # numpy copies on this thread without the GIL; torch.cat would wake its intra-op
        # threads, which costs more than the copy (see codec.copy_bytes).
        np.concatenate([s.tiles.numpy() for s in slices], out=staging.numpy())
        return staging

    def _copy_out(self, rows: torch.Tensor) -> torch.Tensor:
        """Start copying ``rows`` to the host (on CUDA; on the CPU they are there already)."""
        if not self.streams.cuda:
            return rows
        host = self.streams.host_empty(rows.shape, rows.dtype)
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

    def assemble(self, parts: list[SliceOutput], compress: list[bool] | None) -> torch.Tensor:
        """An image's rows on the host, ``[num_visual_tokens, hidden]``: as copied out by its
        passes, or (``compress`` given) chosen per tile on the device and copied back now."""
        with torch.inference_mode():
            if compress is None:
                blocks = [p.rows for p in parts if p.rows is not None]
                rows = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
                return rows.reshape(-1, self.hidden_size)
            streams = self.streams
            with streams.on(streams.copy_back if streams.cuda else None):
                full = [p.full for p in parts if p.full is not None]
                compressed = [p.compressed for p in parts if p.compressed is not None]
                full_t = full[0] if len(full) == 1 else torch.cat(full)
                compressed_t = compressed[0] if len(compressed) == 1 else torch.cat(compressed)
                per_tile = [compressed_t[i] if c else full_t[i] for i, c in enumerate(compress)]
                chosen = torch.cat(per_tile)  # [num_visual_tokens, hidden] on the device
                return streams.to_host(chosen)

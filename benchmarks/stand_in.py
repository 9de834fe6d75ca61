"""A stand-in for the vision encoder's device, for measuring the host side without a GPU.

``StandInDevice.run_pass`` replaces ``EncoderEngine.run_pass`` (the batcher's pass): a pass of n
tiles takes ``first_ms + per_more_ms * (n - 1)``, passes run one at a time as on one device,
and no host CPU is spent on them (they only sleep, on the batcher's wait thread). The in-process
levels of ``dvd-bench-vision --stages --stand-in-pass-ms`` use it, and so does the served level
through ``python -m benchmarks.stand_in`` (the real ``dvd-vision-server`` with this device).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from checkpoints.spec import CheckpointSpec
from protos.messages import RowSelection
from vision_server import metrics, server
from vision_server.batching import PassSlice
from vision_server.data_path import SliceOutput
from vision_server.pipeline import VisionPipeline
from vision_server.settings import VisionSettings


class StandInDevice:
    """A device that runs one pass at a time, ``first_ms + per_more_ms * (n - 1)`` for n tiles,
    and needs no host CPU: its passes only sleep, on the batcher's wait thread. Its rows are
    zeros of the right shapes (and p0 zero: the router keeps every tile)."""

    def __init__(self, first_ms: float, per_more_ms: float, spec: CheckpointSpec) -> None:
        self.first_s = first_ms / 1000
        self.per_more_s = per_more_ms / 1000
        self.spec = spec
        self._free_at = 0.0  # when the device finishes what it was given

    def run_pass(self, slices: Sequence[PassSlice]) -> _StandInPass:
        tiles = sum(int(piece.tiles.shape[0]) for piece in slices)
        seconds = self.first_s + self.per_more_s * (tiles - 1)
        self._free_at = max(self._free_at, time.perf_counter()) + seconds
        return _StandInPass(self._free_at, seconds, [self._output(piece) for piece in slices])

    def _output(self, piece: PassSlice) -> SliceOutput:
        count, hidden = int(piece.tiles.shape[0]), self.spec.llm_hidden_size
        if piece.want is RowSelection.FULL:
            return SliceOutput(rows=torch.zeros(count, self.spec.tokens_per_tile, hidden))
        small = torch.zeros(count, self.spec.compressed_tokens_per_tile, hidden)
        if piece.want is RowSelection.COMPRESSED:
            return SliceOutput(rows=small)
        full = torch.zeros(count, self.spec.tokens_per_tile, hidden)
        return SliceOutput(full=full, compressed=small, compress_prob=torch.zeros(count))


class _StandInPass:
    def __init__(self, done_at: float, seconds: float, outputs: list[SliceOutput]) -> None:
        self._done_at = done_at
        self._seconds = seconds
        self._outputs = outputs

    def wait(self) -> list[SliceOutput]:
        time.sleep(max(0.0, self._done_at - time.perf_counter()))
        metrics.device_busy_seconds.inc(self._seconds)
        return self._outputs


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.stand_in FIRST_MS PER_MORE_MS [dvd-vision-server flags]``."""
    args = sys.argv[1:] if argv is None else argv
    first_ms, per_more_ms, server_args = float(args[0]), float(args[1]), args[2:]
    build = server.build_pipeline

    def build_on_stand_in(settings: VisionSettings) -> tuple[VisionPipeline, str]:
        pipeline, model_id = build(settings)  # the real encoder is loaded, and not used
        stand_in = StandInDevice(first_ms, per_more_ms, pipeline.spec)
        pipeline.engine.batcher.run_pass = stand_in.run_pass
        return pipeline, model_id

    server.build_pipeline = build_on_stand_in  # start_server looks it up when it runs
    server.main(server_args)


if __name__ == "__main__":
    main()

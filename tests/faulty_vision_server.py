"""``dvd-vision-server`` with faults injected into its forward passes, for the fault tests.

A pass fails when one of its tiles is entirely one of these grey levels (a flat image of that
colour), after ``FAULT_DELAY_S`` so that other work can queue behind it:

- 7: ``RuntimeError`` (any bug in a pass);
- 8: ``torch.OutOfMemoryError`` (what CUDA raises when a pass does not fit);
- 9: ``torch.AcceleratorError`` (a sticky CUDA error: the device is unusable).

Everything else is the real server: the injection replaces ``EncoderEngine.run_pass`` with a
wrapper before the engine is built, and calls the real one for healthy passes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from vision_server.batching import PassSlice
from vision_server.engine import EncoderEngine
from vision_server.server import main

FAULT_DELAY_S = 1.0
FAULTS = {
    7: lambda: RuntimeError("injected failure"),
    8: lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    9: lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
}

_real_run_pass = EncoderEngine.run_pass


def _faulty_run_pass(self: EncoderEngine, slices: Sequence[PassSlice]):  # type: ignore[no-untyped-def]
    for piece in slices:
        for tile in piece.tiles:
            level = int(tile.flatten()[0])
            if level in FAULTS and bool((tile == level).all()):
                time.sleep(FAULT_DELAY_S)
                raise FAULTS[level]()
    return _real_run_pass(self, slices)


EncoderEngine.run_pass = _faulty_run_pass  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])

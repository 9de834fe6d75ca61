"""``dvd-vision-server`` with faults injected into its forward passes, for the fault tests.

A pass fails when one of its tiles is entirely one of these grey levels (a flat image of that
colour):

- 7: ``RuntimeError`` (any bug in a pass);
- 8: ``torch.OutOfMemoryError`` (what CUDA raises when a pass does not fit);
- 9: ``torch.AcceleratorError`` (a sticky CUDA error: the device is unusable).

Everything else is the real server: run as a script, it replaces ``EncoderEngine.run_pass``
with a wrapper before the engine is built, and calls the real one for healthy passes.

Tests synchronise on events, not on time: a poisoned pass prints ``FAULT_STARTED`` when it
begins. If the file named by ``DVD_TEST_FAULT_HOLD`` exists then, it holds a number N and the
pass waits (on the launch thread, so the batching loop takes no other pass meanwhile) until N
tiles are queued behind it, prints ``FAULT_RELEASED`` with the number it saw, and only then
fails; after ``HOLD_LIMIT_S`` it fails anyway and says so, and the test's check of that line
fails.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from prometheus_client import REGISTRY

from vision_server.batching import PassSlice
from vision_server.engine import EncoderEngine
from vision_server.server import main

FAULT_STARTED = "injected fault: poisoned pass started"
FAULT_RELEASED = "injected fault: poisoned pass released with {queued} tiles queued behind it"
HOLD_LIMIT_S = 60.0
FAULTS = {
    7: lambda: RuntimeError("injected failure"),
    8: lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    9: lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
}

_real_run_pass = EncoderEngine.run_pass


def _queued_tiles() -> int:
    return int(REGISTRY.get_sample_value("dvd:vision_queued_tiles") or 0)


def _hold_until_queued() -> None:
    """Wait until the tiles that the hold file asks for are queued behind this pass."""
    hold = os.environ.get("DVD_TEST_FAULT_HOLD")
    if not hold or not Path(hold).exists():
        return
    wanted = int(Path(hold).read_text())
    deadline = time.monotonic() + HOLD_LIMIT_S
    while (queued := _queued_tiles()) < wanted and time.monotonic() < deadline:
        time.sleep(0.01)  # a bounded poll of the queue gauge
    print(FAULT_RELEASED.format(queued=queued), file=sys.stderr, flush=True)


def _faulty_run_pass(self: EncoderEngine, slices: Sequence[PassSlice]):  # type: ignore[no-untyped-def]
    for piece in slices:
        for tile in piece.tiles:
            level = int(tile.flatten()[0])
            if level in FAULTS and bool((tile == level).all()):
                print(FAULT_STARTED, file=sys.stderr, flush=True)
                _hold_until_queued()
                raise FAULTS[level]()
    return _real_run_pass(self, slices)


if __name__ == "__main__":  # patched only in the server process: tests import the constants
    EncoderEngine.run_pass = _faulty_run_pass  # type: ignore[method-assign]
    main(sys.argv[1:])

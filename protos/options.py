"""Encode options in plain Python, and their wire form: the one definition of the router mode.

Both services speak of the Visual Resolution Router's mode as ``VirMode``; only this module
knows how it maps to the ``dvd.v1.VirMode`` enum on the wire.
"""

from __future__ import annotations

from enum import StrEnum

from protos.dvd.v1 import vision_pb2


class VirMode(StrEnum):
    """How InternVL3.5-Flash's Visual Resolution Router treats an image's tiles."""

    AUTO = "auto"  # the router decides per tile
    OFF = "off"  # every tile keeps 256 tokens
    MAX = "max"  # every tile is compressed to 64 tokens


_TO_WIRE: dict[VirMode | None, vision_pb2.VirMode] = {
    None: vision_pb2.VIR_MODE_UNSPECIFIED,
    VirMode.AUTO: vision_pb2.VIR_MODE_AUTO,
    VirMode.OFF: vision_pb2.VIR_MODE_OFF,
    VirMode.MAX: vision_pb2.VIR_MODE_MAX,
}
_FROM_WIRE: dict[int, VirMode | None] = {int(wire): mode for mode, wire in _TO_WIRE.items()}


def vir_to_wire(mode: VirMode | None) -> vision_pb2.VirMode:
    """The wire value of a router mode (None: unspecified, the service's default)."""
    return _TO_WIRE[mode]


def vir_from_wire(value: int) -> VirMode | None:
    """The router mode of a wire value (None: unspecified); ValueError for unknown values."""
    try:
        return _FROM_WIRE[value]
    except KeyError:
        raise ValueError(f"unknown vir_mode {value}") from None

"""The vision service's error types and, in one place, their gRPC status codes."""

from __future__ import annotations

import grpc


class VisionError(Exception):
    """Base class: a request the vision service refuses or cannot serve."""

    status = grpc.StatusCode.INTERNAL


class InvalidRequest(VisionError):
    """The request is malformed (bad option values, no images…)."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class InvalidImage(InvalidRequest):
    """An image cannot be decoded, is of a refused format, or is too large."""


class TooManyImages(InvalidRequest):
    """More images, or more tiles, in one request than the service allows."""


class Overloaded(VisionError):
    """The tile queue is full; the caller should retry later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDown(VisionError):
    """The server is draining and accepts no new work."""

    status = grpc.StatusCode.UNAVAILABLE


def grpc_status(error: Exception) -> grpc.StatusCode:
    """The gRPC status code for ``error`` (INTERNAL for anything unexpected)."""
    if isinstance(error, VisionError):
        return error.status
    return grpc.StatusCode.INTERNAL

"""The vision service's error types and, in one place, their gRPC status codes."""

from __future__ import annotations

import grpc

# Why an image or video failed in a media worker that ran out of its address space.
MEMORY_LIMIT_REASON = "decoding it needs more memory than the limit"


class VisionError(Exception):
    """Base class: a request the vision service refuses or cannot serve."""

    status = grpc.StatusCode.INTERNAL


class InvalidRequest(VisionError):
    """The request is malformed (bad option values, no images…)."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class InvalidImage(InvalidRequest):
    """An image cannot be decoded, is of a refused format, or is too large."""


class InvalidVideo(InvalidRequest):
    """A video cannot be opened or decoded, is of a refused format or codec, or is over a
    limit (bytes, resolution, duration, frames)."""


class TooManyImages(InvalidRequest):
    """More images, or more tiles, in one request than the service allows."""


class Overloaded(VisionError):
    """The tile queue is full; the caller should retry later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDown(VisionError):
    """The server is draining and accepts no new work."""

    status = grpc.StatusCode.UNAVAILABLE


class EncoderOutOfMemory(VisionError):
    """A forward pass ran out of device memory; only the images in that pass fail."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class EncodeFailed(VisionError):
    """A forward pass failed for another reason; only the images in that pass fail."""

    status = grpc.StatusCode.INTERNAL


class EngineFailed(VisionError):
    """The encoder can no longer run (a broken device context, a dead batching loop): the
    process reports NOT_SERVING and exits so that its supervisor restarts it."""

    status = grpc.StatusCode.UNAVAILABLE


class MediaWorkersUnavailable(VisionError):
    """No media worker process runs (none can be started, or the service is stopping): images
    and videos cannot be decoded here; another replica may."""

    status = grpc.StatusCode.UNAVAILABLE


def grpc_status(error: Exception) -> grpc.StatusCode:
    """The gRPC status code for ``error`` (INTERNAL for anything unexpected)."""
    if isinstance(error, VisionError):
        return error.status
    return grpc.StatusCode.INTERNAL

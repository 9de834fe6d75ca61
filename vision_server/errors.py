"""The vision service's error types and, in one place, their gRPC status codes and their
contract error codes (``protos.messages.ErrorCode``, sent with every error)."""

from __future__ import annotations

import grpc

from protos.messages import ErrorCode, ErrorDetail, Field

# Why an image or video failed in a media worker that ran out of its address space.
MEMORY_LIMIT_REASON = "decoding it needs more memory than the limit"


class VisionError(Exception):
    """Base class: a request the vision service refuses or cannot serve. ``field``: the
    ``EncodeRequest`` field it is about (``protos.messages.Field``), when it is one."""

    status = grpc.StatusCode.INTERNAL
    code = ErrorCode.INTERNAL
    default_field = ""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = self.default_field if field is None else field

    @property
    def detail(self) -> ErrorDetail:
        """What the caller is told besides the message."""
        return ErrorDetail(self.code, self.field)


class InvalidRequest(VisionError):
    """The request is malformed (bad option values, no images…)."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    code = ErrorCode.INVALID_REQUEST


class InvalidImage(InvalidRequest):
    """An image cannot be decoded, is of a refused format, or is too large."""

    code = ErrorCode.INVALID_IMAGE
    default_field = Field.IMAGES


class InvalidVideo(InvalidRequest):
    """A video cannot be opened or decoded, is of a refused format or codec, or is over a
    limit (bytes, resolution, duration, frames)."""

    code = ErrorCode.INVALID_VIDEO
    default_field = Field.VIDEOS


class TooManyItems(InvalidRequest):
    """More images, or more tiles, in one request than the service allows."""

    code = ErrorCode.TOO_MANY_IMAGES
    default_field = Field.IMAGES


class Overloaded(VisionError):
    """The tile queue is full; the caller should retry later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = ErrorCode.OVERLOADED


class ShuttingDown(VisionError):
    """The server is draining and accepts no new work."""

    status = grpc.StatusCode.UNAVAILABLE
    code = ErrorCode.UNAVAILABLE


class EncoderOutOfMemory(VisionError):
    """A forward pass ran out of device memory; only the images in that pass fail."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = ErrorCode.OUT_OF_MEMORY


class EncodeFailed(VisionError):
    """A forward pass failed for another reason; only the images in that pass fail."""

    status = grpc.StatusCode.INTERNAL
    code = ErrorCode.ENCODE_FAILED


class EngineFailed(VisionError):
    """The encoder can no longer run (a broken device context, a dead batching loop): the
    process reports NOT_SERVING and exits so that its supervisor restarts it."""

    status = grpc.StatusCode.UNAVAILABLE
    code = ErrorCode.UNAVAILABLE


class MediaWorkersUnavailable(VisionError):
    """No media worker process runs (none can be started, or the service is stopping): images
    and videos cannot be decoded here; another replica may."""

    status = grpc.StatusCode.UNAVAILABLE
    code = ErrorCode.UNAVAILABLE


def grpc_status(error: Exception) -> grpc.StatusCode:
    """The gRPC status code for ``error`` (INTERNAL for anything unexpected)."""
    if isinstance(error, VisionError):
        return error.status
    return grpc.StatusCode.INTERNAL


def error_detail(error: Exception) -> ErrorDetail:
    """The contract's code and field for ``error`` (INTERNAL for anything unexpected)."""
    if isinstance(error, VisionError):
        return error.detail
    return ErrorDetail(ErrorCode.INTERNAL)

"""The one mapping from vision-side failures to what the HTTP client sees.

The vision service says why a call failed with a contract error code and the request field
it is about (``protos.messages.ErrorDetail``): the remote encoder reads them from the call's
trailing metadata, the in-process one from the vision service's own error types. One table,
``api_error``, turns them into API errors, the same ones the language service raises when it
catches the same condition itself (the words come from ``protos.messages`` on both sides).
Failures that carry no code, gRPC's own (unreachable, deadline, message size) and those of a
vision service that predates the codes, are read from their status code (``vision_error``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import grpc

from llm_server.errors import (
    APIError,
    BadRequest,
    InvalidImage,
    InvalidVideo,
    Overloaded,
    RequestTooLarge,
    TooManyItems,
    VisionBadResponse,
    VisionUnavailable,
)
from protos.messages import ErrorCode, ErrorDetail, Field, error_from_metadata

_UNAVAILABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)

# The API's ``param`` for each request field the vision service can name; what is about an
# image or a video itself (its bytes, its tile cap) is about the messages that hold it.
_PARAMS: dict[str, str] = {
    Field.MAX_TILES: "max_tiles",
    Field.VIR_MODE: "vir",
    Field.VIR_THRESHOLD: "vir_threshold",
    Field.MAX_VISUAL_TOKENS: "max_visual_tokens",
    Field.IMAGE_MAX_VISUAL_TOKENS: "messages",
    Field.NUM_FRAMES: "num_frames",
    Field.IMAGES: "messages",
    Field.IMAGE_MAX_TILES: "messages",
    Field.VIDEOS: "messages",
}


def _unavailable(message: str) -> APIError:
    return VisionUnavailable(
        f"vision service is unavailable ({message or 'UNAVAILABLE'}); retry later"
    )


def _overloaded(message: str) -> APIError:
    return Overloaded(f"vision service is overloaded: {message}")


def _internal(message: str) -> APIError:
    return APIError(f"vision service error: INTERNAL: {message}")


# Code -> the API error (message, param). Request errors keep the vision service's words.
_API_ERRORS: dict[ErrorCode, Callable[[str, str | None], APIError]] = {
    ErrorCode.INVALID_REQUEST: lambda message, param: BadRequest(message, param=param),
    ErrorCode.INVALID_IMAGE: lambda message, param: InvalidImage(message, param=param),
    ErrorCode.INVALID_VIDEO: lambda message, param: InvalidVideo(message, param=param),
    ErrorCode.TOO_MANY_IMAGES: lambda message, param: TooManyItems(message, param=param),
    ErrorCode.OVERLOADED: lambda message, _: _overloaded(message),
    ErrorCode.OUT_OF_MEMORY: lambda message, _: _overloaded(message),
    ErrorCode.UNAVAILABLE: lambda message, _: _unavailable(message),
    ErrorCode.ENCODE_FAILED: lambda message, _: _internal(message),
    ErrorCode.INTERNAL: lambda message, _: _internal(message),
    ErrorCode.UNSPECIFIED: lambda message, _: _internal(message),
}


def api_error(detail: ErrorDetail, message: str) -> APIError:
    """The API error for a vision failure with this code and field, and ``message``, the
    vision service's words."""
    return _API_ERRORS[detail.code](message, _PARAMS.get(detail.field))


def rpc_error(error: grpc.aio.AioRpcError, *, request_bytes: int | None = None) -> APIError:
    """The API error for a failed call to the vision service: by the code it sent, or by the
    status code when it sent none."""
    details = error.details() or ""
    detail = error_from_metadata(error.trailing_metadata())
    if detail is not None:
        return api_error(detail, details)
    return vision_error(error.code(), details, request_bytes=request_bytes)


# Request options a vision service without error codes validates; its messages name the
# option first ("vir='max' needs…", "max_tiles=50 exceeds…", "vir_threshold must be…").
_OPTION_PARAMS = ("vir_threshold", "max_tiles", "vir", "num_frames")

# grpc's own message-size errors (not the vision service's full queue, also RESOURCE_EXHAUSTED):
# "SERVER: Received message larger than max (N vs. M)", "CLIENT: Sent message larger than …".
_SIZE_LIMIT = re.compile(
    r"(?:(?P<side>CLIENT|SERVER): )?(?P<verb>Received|Sent) message larger than max "
    r"\((?P<size>\d+) vs\. (?P<limit>\d+)\)"
)


def vision_error(
    code: grpc.StatusCode, details: str, *, request_bytes: int | None = None
) -> APIError:
    """The API error for a vision failure that carries no error code: gRPC status ``code``
    and message ``details``.

    ``request_bytes``, the serialized size of the Encode request, tells a request that was too
    large for the vision service from a reply that was too large for us when grpc does not say
    which side refused the message."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return _invalid_argument(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        size_limit = _SIZE_LIMIT.search(details)
        if size_limit is not None:
            return _message_too_large(size_limit, details, request_bytes)
        return Overloaded(f"vision service is overloaded: {details}")
    if code in _UNAVAILABLE:
        reason = (
            "did not answer in time"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED
            else "is unavailable"
        )
        return VisionUnavailable(f"vision service {reason} ({details or code.name}); retry later")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return BadRequest(details)
    return APIError(f"vision service error: {code.name}: {details}")


def _invalid_argument(details: str) -> APIError:
    """A vision service that predates error codes: the field is the option its message
    starts with, else the image or video it names."""
    for option in _OPTION_PARAMS:
        rest = details.removeprefix(option)
        if rest != details and not (rest[:1].isalnum() or rest[:1] == "_"):
            return BadRequest(details, param=option)
    if details.startswith("video "):  # "video 0: cannot decode…"
        return InvalidVideo(details, param="messages")
    return InvalidImage(details, param="messages")


def _message_too_large(
    size_limit: re.Match[str], details: str, request_bytes: int | None
) -> APIError:
    size, limit = int(size_limit["size"]), int(size_limit["limit"])
    side, verb = size_limit["side"], size_limit["verb"]
    if side is None:  # older grpc: the request is the message whose size we know
        ours = verb == "Sent" or size == request_bytes
    else:
        ours = verb == "Sent" or side == "SERVER"
    if ours:
        return RequestTooLarge(
            f"the images of this request make a {size}-byte message to the vision service, "
            f"over its limit of {limit} bytes; send fewer or smaller images"
        )
    return VisionBadResponse(
        f"vision service sent a {size}-byte message, over this service's limit of {limit} "
        f"bytes ({details})"
    )

"""The one mapping from vision-side failures to what the HTTP client sees.

Both image encoders report failures as gRPC status codes: the remote one gets them from the
call, the in-process one from the vision service's own error types (``VisionError.status``).
"""

from __future__ import annotations

import re

import grpc

from llm_server.errors import (
    APIError,
    BadRequest,
    InvalidImage,
    InvalidVideo,
    Overloaded,
    RequestTooLarge,
    VisionBadResponse,
    VisionUnavailable,
)

_UNAVAILABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)

# Request options the vision service validates; its messages name the option first
# ("vir='max' needs…", "max_tiles=50 exceeds…", "vir_threshold must be…", "num_frames=…").
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
    """The API error for a vision failure with gRPC status ``code`` and message ``details``.

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
    """The vision service's own words, with the request field they are about."""
    for option in _OPTION_PARAMS:
        if re.match(rf"{option}\b", details):
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

"""The one mapping from vision-side failures to what the HTTP client sees.

Both image encoders report failures as gRPC status codes: the remote one gets them from the
call, the in-process one from the vision service's own error types (``VisionError.status``).
"""

from __future__ import annotations

import grpc

from llm_server.errors import APIError, BadRequest, InvalidImage, Overloaded, VisionUnavailable

_UNAVAILABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


def vision_error(code: grpc.StatusCode, details: str) -> APIError:
    """The API error for a vision failure with gRPC status ``code`` and message ``details``."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidImage(details, param="messages")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
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

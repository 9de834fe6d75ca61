"""The language service's error types and, in one place, their HTTP status and OpenAI shape."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """Base class: an error returned to the client as OpenAI's error JSON."""

    status_code = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(APIError):
    """The request is malformed or asks for something this server does not do."""

    status_code = 400
    error_type = "invalid_request_error"


class InvalidImage(BadRequest):
    """An image cannot be fetched, decoded or accepted."""

    code = "invalid_image"


class InvalidVideo(BadRequest):
    """A video cannot be fetched, decoded or accepted."""

    code = "invalid_video"


class TooManyItems(BadRequest):
    code = "too_many_images"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class RequestTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(APIError):
    status_code = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class RequestTimeout(APIError):
    """The client did not send its request within the deadline."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class Unauthorized(APIError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ResponseNotFound(APIError):
    """A stored response that does not exist, has expired or was evicted (``/v1/responses``)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


class Overloaded(APIError):
    """Too much work in flight; the client should retry later."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class VisionUnavailable(APIError):
    """The vision service cannot be reached or did not answer in time."""

    status_code = 503
    error_type = "service_unavailable"
    code = "vision_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class VisionModelMismatch(VisionUnavailable):
    """The vision service serves another model or checkpoint than the language model's: its
    rows cannot be used (until one of the two services is redeployed)."""

    code = "vision_model_mismatch"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=30)


class VisionBadResponse(APIError):
    """The vision service answered with something that is not a valid embedding stream."""

    status_code = 502
    error_type = "bad_gateway"
    code = "vision_bad_response"


class EngineUnavailable(APIError):
    """The language engine is not running (starting, stopping or dead)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "engine_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}

"""Errors of the HTTP API in OpenAI's shape: ``{"error":{"message","type","param","code"}}``."""

from __future__ import annotations

import json
import math

from aiohttp import web

#: OpenAI's ``type`` for each status the API answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """A refusal with its HTTP status; ``message`` never echoes a secret or the raw input."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        """The JSON error object (also sent inside a stream as its last data line)."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        """The error as an HTTP response (``Retry-After`` in whole seconds where given)."""
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


#: Engine and limit error codes → HTTP status of the refusal.
ENGINE_STATUS = {
    "busy": 429,
    "rate_limited": 429,
    "too_large": 413,
    "bad_image": 400,
    "bad_request": 400,
    "timeout": 500,
    "cancelled": 400,
    "internal": 500,
}


def from_engine(code: str, message: str, retry_after: float | None = None) -> ApiError:
    """An :class:`ApiError` for an engine refusal (``busy`` → 429 with ``Retry-After``)."""
    status = ENGINE_STATUS.get(code, 500)
    if status == 429 and retry_after is None:
        retry_after = 1.0
    return ApiError(status, message, code=code, retry_after=retry_after)

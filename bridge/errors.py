"""The JSON error shape of every HTTP error: ``{"error":{"code":"...","message":"..."}}``."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler


def error_response(status: int, code: str, message: str) -> web.Response:
    """A JSON error response with a stable machine-readable code."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text HTTP errors (404, 405, 413...) into the JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = {
            404: "not_found",
            405: "method_not_allowed",
            413: "too_large",
            401: "unauthorized",
            403: "forbidden",
        }.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)

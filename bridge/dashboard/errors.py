"""JSON errors and security headers for every dashboard and ``/api/*`` answer.

docs/dashboard.md gives errors as ``{"error":{"code","message"}}``; the middleware also turns
the router's own 404/405 (unknown path, dashboard disabled) into that shape, only under the
dashboard's prefixes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON error response in the documented shape."""
    response = web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )
    response.headers["Cache-Control"] = "no-store"
    return response


class ApiError(Exception):
    """Raised by handlers to answer with a JSON error (status, code, message, extra headers)."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def is_dashboard_path(path: str) -> bool:
    """True for ``/dashboard``, ``/dashboard/...`` and ``/api/...``: the paths this package owns."""
    return path in ("/dashboard", "/api") or path.startswith(("/dashboard/", "/api/"))


@web.middleware
async def dashboard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors and security headers on the dashboard's paths; other paths pass untouched."""
    if not is_dashboard_path(request.path):
        return await handler(request)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = json_error(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = _CODES.get(exc.status, "error")
        message = exc.reason if exc.status != 404 else "no such resource"
        response = json_error(exc.status, code, message, _allow_header(exc))
    except Exception:
        # Never leak a traceback to the browser; the log has it with the path.
        log.exception("dashboard_handler_failed", path=request.path, method=request.method)
        response = json_error(500, "internal", "internal error; see the bridge log")
    if not response.prepared:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


def _allow_header(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}

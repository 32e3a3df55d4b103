"""Who is calling a dashboard route (Bearer admin token or session cookie) and the CSRF and
same-origin checks a cookie caller must pass, apart from the handlers that rely on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from aiohttp import web

from bridge.dashboard.auth import CSRF_HEADER, SESSION_COOKIE, AdminAuth, Session
from bridge.dashboard.errors import ApiError

_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the Bearer token holder, or a browser with a dashboard session."""

    kind: Literal["bearer", "cookie"]
    session: Session | None = None


class Access:
    """Authenticates dashboard requests against one :class:`AdminAuth`."""

    def __init__(self, auth: AdminAuth) -> None:
        self.auth = auth

    def principal(self, request: web.Request) -> Principal | None:
        """The caller, or ``None`` when it brought no credentials.

        Raises:
            ApiError: 401 when an ``Authorization`` header is present but wrong.
        """
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, credential = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not self.auth.check_token(credential.strip()):
                raise ApiError(
                    401,
                    "unauthorized",
                    "invalid admin token",
                    {"WWW-Authenticate": 'Bearer realm="bridge", error="invalid_token"'},
                )
            return Principal("bearer")
        session = self.auth.verify(request.cookies.get(SESSION_COOKIE))
        return Principal("cookie", session) if session is not None else None

    def require(self, request: web.Request) -> Principal:
        """The authenticated caller; cookie callers of unsafe methods must pass the CSRF checks.

        Raises:
            ApiError: 401 without valid credentials, 403 when a CSRF check fails.
        """
        principal = self.principal(request)
        if principal is None:
            raise ApiError(
                401,
                "unauthorized",
                "admin token required (Authorization: Bearer, or log in at /dashboard)",
                {"WWW-Authenticate": 'Bearer realm="bridge"'},
            )
        if principal.session is not None and request.method in _UNSAFE_METHODS:
            check_same_origin(request)
            token = request.headers.get(CSRF_HEADER)
            if not self.auth.check_csrf(principal.session, token):
                raise ApiError(403, "csrf_failed", f"missing or wrong {CSRF_HEADER} header")
        return principal


def check_same_origin(request: web.Request) -> None:
    """Refuse (403) a request the browser marks cross-site or whose ``Origin`` is another host."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise ApiError(403, "csrf_failed", "cross-site request refused")
    origin = request.headers.get("Origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc != request.host):
        raise ApiError(403, "csrf_failed", "cross-origin request refused")

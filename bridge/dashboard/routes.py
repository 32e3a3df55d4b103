"""The dashboard's HTTP surface: pages, login/logout, the admin API and the live event stream.

:func:`setup_dashboard` registers everything on the bridge's aiohttp application. Callers
authenticate with ``Authorization: Bearer <admin token>`` or the session cookie the login form
sets; state-changing calls made with the cookie also need the CSRF token. Without an admin token
every route answers 404, so a bridge started without one exposes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from bridge.dashboard.access import Access, Principal, check_same_origin
from bridge.dashboard.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, AdminAuth, LoginLimiter
from bridge.dashboard.bodies import json_response, read_form, read_json, redirect
from bridge.dashboard.errors import ApiError, dashboard_middleware
from bridge.dashboard.pages import STATIC_DIR, Pages
from bridge.dashboard.params import parse_query
from bridge.dashboard.source import ConnectionQuery, OpsSource
from bridge.dashboard.sse import EventStreams
from engine.types import EngineError

__all__ = ["DASHBOARD_KEY", "STATIC_DIR", "Dashboard", "Principal", "setup_dashboard"]

log = structlog.get_logger(__name__)

_MAX_ID_CHARS = 128
_MAX_MODEL_CHARS = 512
_ERRORS_SHOWN = 20


class Dashboard:
    """Handlers of the dashboard routes, bound to one :class:`OpsSource` and one admin token."""

    def __init__(
        self,
        source: OpsSource,
        auth: AdminAuth,
        streams: EventStreams,
        clock: Callable[[], float],
        limiter: LoginLimiter,
    ) -> None:
        self.source = source
        self.auth = auth
        self.streams = streams
        self._clock = clock
        self._limiter = limiter
        self._access = Access(auth)
        self._pages = Pages()
        self._swap_lock = asyncio.Lock()

    # -- authentication (bridge.dashboard.access) -----------------------------------------

    def principal(self, request: web.Request) -> Principal | None:
        """The caller, or ``None`` when it brought no credentials (see :class:`Access`)."""
        return self._access.principal(request)

    def require(self, request: web.Request) -> Principal:
        """The authenticated caller, CSRF-checked for cookie callers (see :class:`Access`)."""
        return self._access.require(request)

    # -- pages ----------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        """``GET /dashboard``: the live page, or a redirect to the login form."""
        if self.principal(request) is None:
            raise web.HTTPSeeOther("/dashboard/login")
        return self._pages.html("dashboard.html")

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        """``GET /dashboard/login``: the token form (straight to the page when logged in)."""
        if self.auth.verify(request.cookies.get(SESSION_COOKIE)) is not None:
            raise web.HTTPSeeOther("/dashboard")
        return self._pages.html("login.html")

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``POST /dashboard/login``: check the token, set the session and CSRF cookies."""
        remote = request.remote or "unknown"
        check_same_origin(request)
        if self._limiter.blocked(remote):
            log.warning("dashboard_login_throttled", remote=remote)
            return self._pages.html("login.html", 429, "Too many failed attempts. Wait a minute.")
        fields = await read_form(request)
        candidate = fields.get("token", "")
        if not candidate or not self.auth.check_token(candidate):
            self._limiter.failed(remote)
            log.warning("dashboard_login_failed", remote=remote)
            return self._pages.html("login.html", 401, "Wrong admin token.")
        self._limiter.succeeded(remote)
        cookie, session = self.auth.issue()
        response = redirect("/dashboard")
        max_age = max(1, int(session.expires_at - self._clock()))
        common: dict[str, Any] = {
            "path": "/",
            "max_age": max_age,
            "samesite": "Strict",
            "secure": request.secure,
        }
        response.set_cookie(SESSION_COOKIE, cookie, httponly=True, **common)
        response.set_cookie(CSRF_COOKIE, self.auth.csrf_token(session), **common)
        response.headers["Cache-Control"] = "no-store"
        log.info("dashboard_login", remote=remote)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """``POST /dashboard/logout``: revoke the session (form field ``csrf`` or the header)."""
        session = self.auth.verify(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            check_same_origin(request)
            fields = await read_form(request, required=False)
            token = request.headers.get(CSRF_HEADER) or fields.get("csrf")
            if not self.auth.check_csrf(session, token):
                raise ApiError(403, "csrf_failed", "missing or wrong CSRF token")
            self.auth.revoke(session)
            log.info("dashboard_logout", remote=request.remote)
        response = redirect("/dashboard/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        response.del_cookie(CSRF_COOKIE, path="/")
        return response

    async def static(self, request: web.Request) -> web.StreamResponse:
        """``GET /dashboard/static/{name}``: one of the bundled assets (no listing, no paths)."""
        return self._pages.asset(request.match_info["name"])

    # -- API ------------------------------------------------------------------------------

    async def list_connections(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/connections``: the connections (``q``, ``state``, ``sort``, paging...).

        Without ``limit`` every matching connection is listed, as docs/dashboard.md shows the
        whole list; the dashboard asks for pages.
        """
        self.require(request)
        query = parse_query(request.query, default_limit=None)
        return json_response(self.source.connections(query).to_json(query))

    async def kick(self, request: web.Request) -> web.StreamResponse:
        """``DELETE /api/connections/{id}``: close that connection with code 4000."""
        principal = self.require(request)
        conn_id = request.match_info["conn_id"]
        if len(conn_id) > _MAX_ID_CHARS or not conn_id.isprintable():
            raise ApiError(400, "bad_request", "malformed connection id")
        if not await self.source.kick(conn_id):
            raise ApiError(404, "not_found", "no open connection with that id")
        log.info("dashboard_kick", conn_id=conn_id, by=principal.kind, remote=request.remote)
        return json_response({"id": conn_id, "closed": True, "code": 4000})

    async def status(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/status``: engine, adapters, recent errors, timeline and connection counts."""
        self.require(request)
        counts = self.source.connections(ConnectionQuery(limit=1)).counts
        return json_response({"now": self._clock(), "counts": counts, **self._panels()})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/events``: server-sent ``snapshot`` events of the page and panels."""
        principal = self.require(request)
        query = parse_query(request.query)

        def snapshot() -> dict[str, Any]:
            page = self.source.connections(query).to_json(query)
            return {"now": self._clock(), "page": page, **self._panels()}

        def still_valid() -> bool:
            if principal.session is None:
                return True
            return self.auth.verify(request.cookies.get(SESSION_COOKIE)) is not None

        return await self.streams.serve(request, snapshot, still_valid)

    async def swap_model(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/admin/model`` with ``{"model": NAME}``: hot-swap the engine's model."""
        principal = self.require(request)
        body = await read_json(request)
        name = body.get("model")
        if not isinstance(name, str) or not name.strip() or len(name) > _MAX_MODEL_CHARS:
            raise ApiError(400, "bad_request", "'model' must be a non-empty string")
        if not name.isprintable():
            raise ApiError(400, "bad_request", "'model' contains control characters")
        if self._swap_lock.locked():
            raise ApiError(409, "conflict", "a model swap is already in progress")
        async with self._swap_lock:
            log.info("dashboard_model_swap", model=name, by=principal.kind)
            try:
                result = await self.source.swap_model(name.strip())
            except EngineError as exc:
                raise ApiError(409, exc.code, exc.message) from exc
            except ValueError as exc:
                raise ApiError(400, "bad_request", str(exc)[:300]) from exc
        return json_response({"model": name.strip(), **result})

    def _panels(self) -> dict[str, Any]:
        return {
            "engine": self.source.engine_status(),
            "adapters": self.source.adapter_statuses(),
            "errors": self.source.recent_errors(_ERRORS_SHOWN),
            "timeline": self.source.timeline(),
            "grants": _grants(self.source),
            "http": _http_jobs(self.source),
        }


def _grants(source: OpsSource) -> list[dict[str, Any]]:
    """The topic grants per token label, when the source knows them (older sources do not)."""
    grants = getattr(source, "topic_grants", None)
    return list(grants()) if grants is not None else []


def _http_jobs(source: OpsSource) -> dict[str, Any]:
    """The HTTP API's jobs, when the source serves that API (fakes and older sources do not)."""
    board = getattr(source, "http_jobs", None)
    return dict(board()) if board is not None else {"live": 0, "jobs": []}


async def _disabled(_request: web.Request) -> web.StreamResponse:
    raise ApiError(404, "not_found", "the dashboard is disabled (no --admin-token)")


DASHBOARD_KEY = web.AppKey("dashboard", Dashboard)


def setup_dashboard(
    app: web.Application,
    source: OpsSource,
    admin_token: str | None,
    clock: Callable[[], float] = time.time,
    *,
    refresh_s: float = 1.0,
    session_ttl_s: float = 12 * 3600,
    max_streams: int = 64,
) -> Dashboard | None:
    """Register the dashboard, login/logout, ``/api/*`` and the static assets on ``app``.

    Args:
        app: the bridge's application (not yet started).
        source: where connections, statuses and actions come from.
        admin_token: the ``--admin-token``; ``None`` or empty disables everything (404).
        clock: wall-clock seconds, for session expiry and the ``now`` field (tests inject one).
        refresh_s: seconds between server-sent snapshots.
        session_ttl_s: lifetime of a dashboard login.
        max_streams: most concurrent ``/api/events`` streams.

    Returns:
        The :class:`Dashboard` (also at ``app[DASHBOARD_KEY]``), or ``None`` when disabled.
    """
    app.middlewares.append(dashboard_middleware)
    router = app.router
    if not admin_token:
        for path in (
            "/dashboard",
            "/dashboard/{tail:.*}",
            "/api/connections",
            "/api/connections/{conn_id}",
            "/api/status",
            "/api/events",
            "/api/admin/model",
        ):
            router.add_route("*", path, _disabled)
        log.info("dashboard_disabled", reason="no admin token")
        return None
    streams = EventStreams(interval_s=refresh_s, max_streams=max_streams)
    dashboard = Dashboard(
        source=source,
        auth=AdminAuth(admin_token, session_ttl_s=session_ttl_s, clock=clock),
        streams=streams,
        clock=clock,
        limiter=LoginLimiter(clock=clock),
    )
    app[DASHBOARD_KEY] = dashboard
    app.on_shutdown.append(streams.on_shutdown)
    router.add_get("/dashboard", dashboard.page)
    router.add_get("/dashboard/login", dashboard.login_form)
    router.add_post("/dashboard/login", dashboard.login)
    router.add_post("/dashboard/logout", dashboard.logout)
    router.add_get("/dashboard/static/{name}", dashboard.static)
    router.add_get("/api/connections", dashboard.list_connections)
    router.add_delete("/api/connections/{conn_id}", dashboard.kick)
    router.add_get("/api/status", dashboard.status)
    router.add_get("/api/events", dashboard.events)
    router.add_post("/api/admin/model", dashboard.swap_model)
    return dashboard

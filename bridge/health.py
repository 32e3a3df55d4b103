"""``/healthz`` and ``/readyz``: liveness of the process and readiness to take traffic."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(slots=True)
class Readiness:
    """The answer of one readiness check: ready or not, with reasons and component details."""

    ready: bool
    reasons: list[str] = field(default_factory=list)
    components: dict[str, Any] = field(default_factory=dict)
    #: The replica's load (``engine.load.LoadReport.to_dict``), answered as ``load``.
    load: dict[str, Any] | None = None


ReadinessCheck = Callable[[], Awaitable[Readiness]]


def add_health_routes(app: web.Application, check: ReadinessCheck, timeout_s: float = 2.0) -> None:
    """Register ``GET /healthz`` (always 200 while serving) and ``GET /readyz`` (200 or 503,
    with the replica's load for balancers either way)."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        try:
            result = await asyncio.wait_for(check(), timeout_s)
        except TimeoutError:
            result = Readiness(False, ["readiness check timed out"])
        body: dict[str, Any] = {
            "status": "ready" if result.ready else "not_ready",
            "components": result.components,
        }
        if result.load is not None:
            body["load"] = result.load
        if not result.ready:
            body["reason"] = "; ".join(result.reasons) or "not ready"
        return web.json_response(body, status=200 if result.ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

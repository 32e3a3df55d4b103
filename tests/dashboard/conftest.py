"""Fixtures: a bridge-less aiohttp app with only the dashboard, served on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.dashboard import Dashboard, setup_dashboard
from tests.dashboard.fakes import FakeClock, FakeOpsSource

TOKEN = "s3cret-admin-token-for-tests"


@dataclass
class Env:
    """One running dashboard: its client, fake source, clock and handler object."""

    client: TestClient[web.Request, web.Application]
    source: FakeOpsSource
    clock: FakeClock
    dashboard: Dashboard

    async def login(self) -> str:
        """Log in through the form; returns the CSRF token the page would read."""
        resp = await self.client.post(
            "/dashboard/login", data={"token": TOKEN}, allow_redirects=False
        )
        assert resp.status == 303, await resp.text()
        return resp.cookies["bridge_csrf"].value


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    clock = FakeClock()
    source = FakeOpsSource(clock)
    app = web.Application()
    dashboard = setup_dashboard(app, source, TOKEN, clock=clock, refresh_s=0.05)
    assert dashboard is not None
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Env(client, source, clock, dashboard)
    finally:
        await client.close()


BEARER = {"Authorization": f"Bearer {TOKEN}"}

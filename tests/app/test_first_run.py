"""A first run without a client token says so at start instead of silently refusing clients."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from bridge.app import BridgeApp
from bridge.config import load_settings
from bridge.store.memory import MemoryStore
from tests.app.fakes import FakeEngine
from tests.app.procs import free_port


@pytest.mark.parametrize(
    ("options", "warned"),
    [
        ({}, True),
        ({"token": ["client-a"]}, False),
        ({"admin-token": "admin-a"}, False),  # an admin token also opens /ws
    ],
)
async def test_start_warns_when_no_token_is_configured(
    options: dict[str, object], warned: bool
) -> None:
    settings = load_settings({"port": str(free_port()), **options}, env={})
    app = BridgeApp(settings, engine=FakeEngine(), store=MemoryStore(), adapters=[])
    with capture_logs() as logs:
        await app.start()
        await app.stop(grace_s=0.5)
    warnings = [e for e in logs if e["event"] == "hub_no_tokens"]
    assert len(warnings) == int(warned), logs
    if warned:
        assert warnings[0]["log_level"] == "warning"
        assert "4001" in warnings[0]["detail"]

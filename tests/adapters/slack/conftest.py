"""Fixtures of the Slack adapter tests: a started fake Slack on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.adapters.slack.fake_slack import FakeSlack


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    """A running fake Slack (Web API, Socket Mode socket, private files)."""
    fake = FakeSlack()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()

"""One bridge process per harness, shared by the module's tests (ids keep their data apart)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.adapters.conformance.live import LiveBridge
from tests.adapters.conformance.platforms import HARNESSES


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=list(HARNESSES))
async def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveBridge]:
    """A started fake platform and a ready ``bridge serve`` linked to it."""
    harness = HARNESSES[request.param]()
    await harness.start()
    bridge = LiveBridge(harness, tmp_path_factory.mktemp(request.param))
    try:
        await bridge.start()
        yield bridge
    finally:
        await bridge.stop()
        await harness.stop()

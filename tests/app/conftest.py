"""Fixtures of the end-to-end tests: a fake Feishu (OpenAPI and gateway) on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.adapters.fake_feishu import FakeFeishu
from tests.conftest import IMAGES


@pytest.fixture
async def feishu() -> AsyncIterator[FakeFeishu]:
    """A started fake Feishu that serves the sample message's photo."""
    fake = FakeFeishu()
    fake.images["img_v3_sample_coffee"] = (IMAGES / "coffee.jpg").read_bytes()
    await fake.start()
    yield fake
    await fake.stop()

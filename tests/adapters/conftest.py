"""Fixtures of the adapter tests: the loopback fake Feishu and the wire samples."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.adapters.fake_feishu import FakeFeishu
from tests.conftest import DATA

SAMPLES = DATA / "feishu"
IMAGES = DATA / "images"


def load_sample(name: str) -> dict[str, Any]:
    """A wire sample: ``{"note", "headers", "body"}`` with ``body`` as raw bytes."""
    data: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    data["body"] = data["body"].encode()
    return data


@pytest.fixture
async def fake() -> AsyncIterator[FakeFeishu]:
    """A running fake Feishu (OpenAPI and gateway) on loopback."""
    service = FakeFeishu()
    await service.start()
    try:
        yield service
    finally:
        await service.stop()

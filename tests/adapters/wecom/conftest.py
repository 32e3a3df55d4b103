"""Fixtures of the WeCom adapter tests: the loopback fake WeCom and an adapter bound to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.wecom import WeComAdapter, WeComConfig
from tests.adapters.wecom.fake_wecom import AES_KEY, AGENT_ID, CORP_ID, SECRET, TOKEN, FakeWeCom
from tests.conftest import IMAGES


@pytest.fixture
async def wecom() -> AsyncIterator[FakeWeCom]:
    """A running fake WeCom that serves one photo as ``media-coffee``."""
    fake = FakeWeCom()
    fake.media["media-coffee"] = ((IMAGES / "coffee.jpg").read_bytes(), "image/jpeg")
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def make_config(base_url: str, **overrides: object) -> WeComConfig:
    """The fake's app, with fast retries."""
    values: dict[str, object] = {
        "corp_id": CORP_ID,
        "agent_id": AGENT_ID,
        "secret": SECRET,
        "token": TOKEN,
        "aes_key": AES_KEY,
        "base_url": base_url,
        "api_backoff_base_s": 0.01,
        "api_backoff_max_s": 0.05,
        **overrides,
    }
    return WeComConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def adapter(wecom: FakeWeCom) -> AsyncIterator[WeComAdapter]:
    """An adapter talking to the fake over real loopback HTTP."""
    a = WeComAdapter(make_config(wecom.base_url))
    try:
        yield a
    finally:
        await a.stop()

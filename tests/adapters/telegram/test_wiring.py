"""The bridge's Telegram wiring: option checks, secrets kept out of settings, the offset key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_settings
from bridge.metrics import Metrics
from bridge.platforms import build_adapters, check_settings, webhook_routes
from bridge.platforms.telegram import StoreOffsets
from bridge.store import open_store
from tests.adapters.telegram.fake_telegram import TOKEN


def settings(**flags: str) -> object:
    return load_settings({k.replace("_", "-"): v for k, v in flags.items()}, env={})


def test_modes_need_their_options_and_errors_name_no_secret() -> None:
    with pytest.raises(ConfigError, match="--telegram-token"):
        settings(telegram_mode="polling")
    with pytest.raises(ConfigError, match="--telegram-webhook-secret") as info:
        settings(telegram_mode="webhook", telegram_token=TOKEN)
    assert TOKEN not in str(info.value)
    with pytest.raises(ConfigError, match="A-Z") as bad:
        settings(telegram_mode="webhook", telegram_token=TOKEN, telegram_webhook_secret="a b!")
    assert "a b!" not in str(bad.value)
    with pytest.raises(ConfigError):
        settings(telegram_mode="longpoll")
    with pytest.raises(ConfigError):
        settings(telegram_group_mode="some")
    ok = settings(telegram_mode="webhook", telegram_token=TOKEN, telegram_webhook_secret="s3cr3t")
    check_settings(ok)  # type: ignore[arg-type]
    assert TOKEN not in repr(ok) and "s3cr3t" not in repr(ok)


async def test_build_wires_the_store_offsets_and_the_webhook_route(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'b.db'}")
    await store.open()
    try:
        s = settings(telegram_mode="webhook", telegram_token=TOKEN, telegram_webhook_secret="x")
        adapters = build_adapters(s, Metrics(), store)  # type: ignore[arg-type]
        assert [a.platform for a in adapters] == ["telegram"]
        routes = webhook_routes(adapters, s)  # type: ignore[arg-type]
        assert [(m, p) for m, p, _ in routes] == [("POST", "/webhooks/telegram")]
        off = settings()
        assert build_adapters(off, Metrics(), store) == []  # type: ignore[arg-type]
        offsets = StoreOffsets(store, TOKEN)
        assert offsets.key == "telegram:offset:123456789" and TOKEN not in offsets.key
        assert await offsets.load() is None
        await offsets.save(1001)
        assert await offsets.load() == 1001
        await store.set_value(offsets.key, "garbage")
        assert await offsets.load() is None
    finally:
        await store.close()

"""Telegram wiring: ``--telegram-*`` checks, the adapter with its durable polling offset, and
``POST /webhooks/telegram``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from adapters.base import Adapter
from bridge.config import ConfigError, Settings
from bridge.metrics import Metrics
from bridge.observers import ImMetrics
from bridge.platforms.webhook import json_webhook
from bridge.store.backoff import Backoff

if TYPE_CHECKING:
    from bridge.platforms import Route
    from bridge.store import Store

_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
#: This module's ``build`` takes the store (the polling offset lives there).
USES_STORE = True
#: Re-poll and API retry backoff: 1 s doubling to a minute, jittered.
POLL_BACKOFF_INITIAL_S = 1.0
POLL_BACKOFF_CAP_S = 60.0


class StoreOffsets:
    """The ``getUpdates`` offset in the bridge store's key-value API, one key per bot.

    Keyed by the bot's numeric id (the part of the token before ``:``), never the whole token.
    """

    def __init__(self, store: Store, token: str) -> None:
        self._store = store
        self.key = f"telegram:offset:{token.split(':', 1)[0]}"

    async def load(self) -> int | None:
        """The saved offset (None when absent or unreadable)."""
        raw = await self._store.get_value(self.key)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    async def save(self, offset: int) -> None:
        """Record ``offset`` with no expiry."""
        await self._store.set_value(self.key, str(offset))


def check(s: Settings) -> None:
    """A token is needed in both modes; webhook mode also needs its secret."""
    if s.telegram_mode == "off":
        return
    if not s.telegram_token:
        raise ConfigError(f"--telegram-mode {s.telegram_mode} needs --telegram-token")
    if s.telegram_mode == "webhook" and not s.telegram_webhook_secret:
        raise ConfigError("--telegram-mode webhook needs --telegram-webhook-secret")
    secret = s.telegram_webhook_secret
    if secret is not None and not _SECRET_TOKEN.fullmatch(secret):
        raise ConfigError(
            "--telegram-webhook-secret must be 1-256 characters of A-Z, a-z, 0-9, _ and - "
            "(what setWebhook accepts as secret_token)"
        )


def _delays() -> Backoff:
    return Backoff(POLL_BACKOFF_INITIAL_S, POLL_BACKOFF_CAP_S)


def build(s: Settings, metrics: Metrics, store: Store | None = None) -> list[Adapter]:
    """The Telegram adapter when ``--telegram-mode`` is not ``off``."""
    if s.telegram_mode == "off":
        return []
    if store is None:
        raise ConfigError("the Telegram adapter needs the bridge's store")
    from adapters.telegram import TelegramAdapter, TelegramConfig
    from adapters.telegram.config import BOT_API_MAX_FILE_BYTES

    token = s.telegram_token or ""
    cfg = TelegramConfig(
        mode="webhook" if s.telegram_mode == "webhook" else "polling",
        token=token,
        base_url=s.telegram_base_url,
        webhook_secret=s.telegram_webhook_secret or "",
        group_mode="all" if s.telegram_group_mode == "all" else "mention",
        max_image_bytes=s.limits.image_cap(BOT_API_MAX_FILE_BYTES),
    )
    adapter = TelegramAdapter(
        cfg,
        offsets=StoreOffsets(store, token),
        delays=_delays,
        observer=ImMetrics(metrics, "telegram"),
    )
    return [adapter]


def routes(adapter: Adapter, s: Settings) -> list[Route]:
    """``POST /webhooks/telegram`` in webhook mode."""
    if s.telegram_mode != "webhook":
        return []
    handle: Any = adapter.handle_webhook  # type: ignore[attr-defined]
    return [("POST", "/webhooks/telegram", json_webhook(handle))]

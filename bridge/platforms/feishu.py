"""Feishu wiring: ``--feishu-*`` checks, the adapter, and ``POST /webhooks/feishu``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from adapters.base import Adapter
from bridge.config import ConfigError, Settings
from bridge.metrics import Metrics
from bridge.observers import FeishuMetrics

if TYPE_CHECKING:
    from bridge.platforms import Route


def check(s: Settings) -> None:
    """The app id and secret are needed in both modes; a webhook also needs a way to verify."""
    if s.feishu_mode == "off":
        return
    missing = [
        name
        for name, value in (
            ("--feishu-app-id", s.feishu_app_id),
            ("--feishu-app-secret", s.feishu_app_secret),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"--feishu-mode {s.feishu_mode} needs {' and '.join(missing)}")
    if s.feishu_mode == "webhook" and not (s.feishu_verification_token or s.feishu_encrypt_key):
        raise ConfigError(
            "--feishu-mode webhook needs --feishu-verification-token or --feishu-encrypt-key"
        )


def build(s: Settings, metrics: Metrics) -> list[Adapter]:
    """The Feishu adapter when ``--feishu-mode`` is not ``off``."""
    if s.feishu_mode == "off":
        return []
    from adapters.feishu import FeishuAdapter, FeishuConfig

    cfg = FeishuConfig(
        mode="longconn" if s.feishu_mode == "longconn" else "webhook",
        app_id=s.feishu_app_id,
        app_secret=s.feishu_app_secret or "",
        verification_token=s.feishu_verification_token or "",
        encrypt_key=s.feishu_encrypt_key or "",
        base_url=s.feishu_base_url,
        max_image_bytes=s.limits.image_cap(),
    )
    return [FeishuAdapter(cfg, observer=FeishuMetrics(metrics))]


def routes(adapter: Adapter, s: Settings) -> list[Route]:
    """``POST /webhooks/feishu`` in webhook mode: the adapter answers with a JSON body."""
    if s.feishu_mode != "webhook":
        return []
    handle: Any = adapter.handle_webhook  # type: ignore[attr-defined]

    async def route(request: web.Request) -> web.Response:
        body = await request.read()
        result = await handle(dict(request.headers), body)
        return web.json_response(result.body, status=result.status)

    return [("POST", "/webhooks/feishu", route)]

"""WeCom wiring: ``--wecom-*`` checks, the adapter, and ``GET``/``POST /webhooks/wecom``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from adapters.base import Adapter
from adapters.wecom import WeComAdapter, WeComConfig
from adapters.wecom.config import ConfigError as WeComConfigError
from bridge.config import ConfigError, Settings
from bridge.metrics import Metrics
from bridge.observers import ImMetrics

if TYPE_CHECKING:
    from bridge.platforms import Route

PATH = "/webhooks/wecom"


def check(s: Settings) -> None:
    """Callback mode needs the corp, the app and the three secrets; the AES key must decode."""
    if s.wecom_mode == "off":
        return
    missing = [
        name
        for name, value in (
            ("--wecom-corp-id", s.wecom_corp_id),
            ("--wecom-agent-id", s.wecom_agent_id),
            ("--wecom-secret", s.wecom_secret),
            ("--wecom-token", s.wecom_token),
            ("--wecom-aes-key", s.wecom_aes_key),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"--wecom-mode {s.wecom_mode} needs {' and '.join(missing)}")
    try:
        _config(s).validate()
    except WeComConfigError as exc:  # the message names the field, never its value
        raise ConfigError(f"invalid WeCom settings: {exc}") from None


def _config(s: Settings) -> WeComConfig:
    return WeComConfig(
        corp_id=s.wecom_corp_id,
        agent_id=s.wecom_agent_id,
        secret=s.wecom_secret or "",
        token=s.wecom_token or "",
        aes_key=s.wecom_aes_key or "",
        base_url=s.wecom_base_url,
        max_image_bytes=s.limits.image_cap(),
    )


def build(s: Settings, metrics: Metrics) -> list[Adapter]:
    """The WeCom adapter when ``--wecom-mode`` is ``webhook``."""
    if s.wecom_mode == "off":
        return []
    return [WeComAdapter(_config(s), observer=ImMetrics(metrics, "wecom"))]


def routes(adapter: Adapter, s: Settings) -> list[Route]:
    """``GET`` (URL check) and ``POST`` (messages) on ``/webhooks/wecom``, text/plain answers."""
    if s.wecom_mode != "webhook":
        return []
    assert isinstance(adapter, WeComAdapter)
    limit = adapter.config.max_body_bytes

    async def url_check(request: web.Request) -> web.Response:
        result = adapter.handle_url_check(request.query)
        return web.Response(status=result.status, text=result.text, content_type="text/plain")

    async def callback(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > limit:
            return web.Response(status=413, text="body too large", content_type="text/plain")
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                return web.Response(status=413, text="body too large", content_type="text/plain")
        result = await adapter.handle_callback(request.query, bytes(body))
        return web.Response(status=result.status, text=result.text, content_type="text/plain")

    return [("GET", PATH, url_check), ("POST", PATH, callback)]

"""DingTalk wiring: ``--dingtalk-*`` checks and the Stream-mode adapter (no webhook routes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.base import Adapter
from bridge.config import ConfigError, Settings
from bridge.metrics import Metrics
from bridge.observers import ImMetrics

if TYPE_CHECKING:
    from bridge.platforms import Route


def check(s: Settings) -> None:
    """Stream mode needs the app's client id and client secret."""
    if s.dingtalk_mode == "off":
        return
    missing = [
        name
        for name, value in (
            ("--dingtalk-client-id", s.dingtalk_client_id),
            ("--dingtalk-client-secret", s.dingtalk_client_secret),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"--dingtalk-mode {s.dingtalk_mode} needs {' and '.join(missing)}")


def build(s: Settings, metrics: Metrics) -> list[Adapter]:
    """The DingTalk adapter when ``--dingtalk-mode`` is ``stream``."""
    if s.dingtalk_mode == "off":
        return []
    from adapters.dingtalk import DingTalkAdapter, DingTalkConfig

    cfg = DingTalkConfig(
        mode="stream",
        client_id=s.dingtalk_client_id,
        client_secret=s.dingtalk_client_secret or "",
        base_url=s.dingtalk_base_url,
        card_template_id=s.dingtalk_card_template_id,
        card_content_key=s.dingtalk_card_content_key or "content",
        max_image_bytes=s.limits.image_cap(),
    )
    return [DingTalkAdapter(cfg, observer=ImMetrics(metrics, "dingtalk"))]


def routes(adapter: Adapter, s: Settings) -> list[Route]:
    """Stream mode connects out, so DingTalk serves no HTTP routes."""
    return []

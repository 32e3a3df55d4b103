"""Settings of the DingTalk adapter, validated once; the client secret never appears in repr."""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.base import AdapterError

BOT_MESSAGE_TOPIC = "/v1.0/im/bot/messages/get"


class ConfigError(AdapterError):
    """The DingTalk settings are incomplete or inconsistent."""


@dataclass(frozen=True)
class DingTalkConfig:
    """One DingTalk app (企业内部应用) with a robot, reached in Stream mode.

    Attributes:
        mode: ``stream`` (the only receiving mode the adapter implements).
        client_id: the app's Client ID (formerly AppKey); also the robot code.
        client_secret: the app's Client Secret (formerly AppSecret).
        base_url: the OpenAPI root (``https://api.dingtalk.com``; a fake in tests).
        silent_timeout_s: our deadline: no frame for this long means the socket is dead.
        reconnect_base_s / reconnect_max_s: jittered exponential backoff between tries.
        stable_after_s: a link up this long resets the backoff.
        drain_s: after a ``disconnect``, how long the old link stays open for pending acks.
        api_timeout_s: per HTTP call.
        api_max_attempts: tries per OpenAPI call (rate limits, 5xx, transport errors).
        api_backoff_base_s / api_backoff_max_s: the waits between those tries; a ``Retry-After``
            longer than ``api_backoff_max_s`` fails the call instead of being shortened.
        max_image_bytes: the cap on one downloaded picture; the bridge sets it from its
            shared limit (``--max-image-bytes``).
        token_refresh_margin_s: refresh the access token this long before it expires.
        sink_timeout_s: how long recording one message may take before it is not acked.
        card_template_id: an AI card template (card platform); set, answers stream in a card.
        card_content_key: the template's streamed text variable.
        card_interval_s: the least time between two streamed card updates.
    """

    mode: str = "stream"
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    base_url: str = "https://api.dingtalk.com"
    silent_timeout_s: float = 120.0
    reconnect_base_s: float = 1.0
    reconnect_max_s: float = 60.0
    stable_after_s: float = 30.0
    drain_s: float = 5.0
    api_timeout_s: float = 10.0
    api_max_attempts: int = 5
    api_backoff_base_s: float = 0.5
    api_backoff_max_s: float = 30.0
    max_image_bytes: int = 20 * 1024 * 1024
    token_refresh_margin_s: float = 300.0
    sink_timeout_s: float = 10.0
    card_template_id: str = ""
    card_content_key: str = "content"
    card_interval_s: float = 0.5

    @property
    def api_root(self) -> str:
        """``base_url`` without a trailing slash."""
        return self.base_url.rstrip("/")

    def validate(self) -> None:
        """Raise :class:`ConfigError` when the settings cannot work."""
        if self.mode != "stream":
            raise ConfigError(f"unknown DingTalk mode {self.mode!r} (only 'stream')")
        if not self.client_id or not self.client_secret:
            raise ConfigError("DingTalk stream mode needs the client id and the client secret")
        if not self.api_root.startswith(("http://", "https://")):
            raise ConfigError("DingTalk base URL must be http(s)")
        if self.silent_timeout_s <= 0 or self.reconnect_base_s <= 0:
            raise ConfigError("DingTalk timeouts must be positive")

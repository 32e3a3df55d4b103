"""Settings of the Feishu adapter, with secrets masked in every printed form."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

Mode = Literal["webhook", "longconn"]

_SECRET_FIELDS = frozenset({"app_secret", "verification_token", "encrypt_key"})


class ConfigError(ValueError):
    """The Feishu settings are incomplete or inconsistent."""


@dataclass(frozen=True, slots=True)
class FeishuConfig:
    """Everything the Feishu adapter needs; built by the bridge from flags, env and file.

    Attributes:
        mode: ``webhook`` (Feishu POSTs to us) or ``longconn`` (we connect out to its gateway).
        app_id: the app's App ID (``cli_...``); not secret.
        app_secret: the App Secret (secret).
        verification_token: the event subscription's Verification Token (secret).
        encrypt_key: the Encrypt Key; when set, webhook bodies must be encrypted and signed.
        base_url: where the OpenAPI lives; tests point it at a loopback fake.
        replay_window_s: accepted age (either way) of ``X-Lark-Request-Timestamp``.
        max_body_bytes: largest webhook body accepted.
        sink_timeout_s: how long the webhook waits for the sink before answering 503 (Feishu
            gives up after 3 s).
        max_image_bytes: largest image download accepted; the bridge sets it from its
            shared limit (``--max-image-bytes``).
        api_timeout_s: per-request timeout of OpenAPI calls.
        api_max_attempts: tries per OpenAPI call (retries on 429, 5xx, token expiry, I/O errors).
        api_backoff_base_s / api_backoff_max_s: exponential backoff of retries (jittered).
        rate_limit_max_wait_s: longest ``x-ogw-ratelimit-reset`` waited out; a longer one fails
            the call (retrying sooner than Feishu asked only earns another refusal).
        token_refresh_margin_s: refresh the tenant token this long before it expires.
        patch_interval_s: least time between two card updates of one message (Feishu allows 5/s).
        pong_timeout_s: long connection: seconds to wait for any frame after a ping.
        ping_interval_s: long connection: ping interval until the server's ClientConfig says.
        reconnect_base_s / reconnect_max_s: long connection backoff. The server's ClientConfig
            ReconnectInterval is the base once it arrived (``reconnect_base_s`` until then), the
            waits double up to ``reconnect_max_s`` (never below ReconnectInterval), and the first
            retry waits a random part of ReconnectNonce instead.
        stable_after_s: a connection up this long resets the backoff.
        max_reconnect_attempts: give up after this many failed retries in a row; a retry that
            brings the link up starts the count afresh (-1: follow the server's ReconnectCount,
            which is usually unlimited).
        refused_retry_s: wait between tries after Feishu refused the app itself (wrong
            credentials, code 514; a ban; the connection limit): the state is ``failed`` and the
            link is retried this slowly; 0 stops for good, as Feishu's SDK does.
        fragment_ttl_s: drop an incomplete fragmented event after this long.
        max_event_bytes: largest (reassembled) long-connection event accepted.
    """

    mode: Mode = "webhook"
    app_id: str = ""
    app_secret: str = ""
    verification_token: str = ""
    encrypt_key: str = ""
    base_url: str = "https://open.feishu.cn"
    replay_window_s: float = 300.0
    max_body_bytes: int = 1_000_000
    sink_timeout_s: float = 2.0
    max_image_bytes: int = 20 * 1024 * 1024
    api_timeout_s: float = 10.0
    api_max_attempts: int = 4
    api_backoff_base_s: float = 0.5
    api_backoff_max_s: float = 8.0
    rate_limit_max_wait_s: float = 10.0
    token_refresh_margin_s: float = 600.0
    patch_interval_s: float = 0.25
    pong_timeout_s: float = 10.0
    ping_interval_s: float = 120.0
    reconnect_base_s: float = 1.0
    reconnect_max_s: float = 120.0
    stable_after_s: float = 60.0
    max_reconnect_attempts: int = -1
    refused_retry_s: float = 600.0
    fragment_ttl_s: float = 10.0
    max_event_bytes: int = 4 * 1024 * 1024

    def validate(self) -> None:
        """Check the settings a mode needs.

        Raises:
            ConfigError: something required is missing or out of range (no secret is named).
        """
        if self.mode not in ("webhook", "longconn"):
            raise ConfigError(f"feishu mode must be webhook or longconn, not {self.mode!r}")
        if not self.app_id or not self.app_secret:
            raise ConfigError("feishu app_id and app_secret are required")
        if self.mode == "webhook" and not (self.verification_token or self.encrypt_key):
            raise ConfigError("feishu webhook mode needs a verification_token or an encrypt_key")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("feishu base_url must be an http(s) URL")
        for name in ("replay_window_s", "sink_timeout_s", "patch_interval_s", "pong_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"feishu {name} must be positive")
        if self.api_max_attempts < 1:
            raise ConfigError("feishu api_max_attempts must be at least 1")

    @property
    def api_root(self) -> str:
        """``base_url`` without a trailing slash."""
        return self.base_url.rstrip("/")

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            masked = "'***'" if value else "''"
            shown = masked if f.name in _SECRET_FIELDS else repr(value)
            parts.append(f"{f.name}={shown}")
        return f"FeishuConfig({', '.join(parts)})"

    __str__ = __repr__

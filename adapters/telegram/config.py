"""Settings of the Telegram adapter, with the bot token and webhook secret masked when printed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from adapters.secrets import masked_repr

Mode = Literal["polling", "webhook"]
GroupMode = Literal["mention", "all"]

_SECRET_FIELDS = frozenset({"token", "webhook_secret"})
#: Telegram's limit on a message's text, in characters (the adapter counts UTF-16 code units,
#: which is never fewer, so a truncated text always fits).
MAX_TEXT = 4096


class ConfigError(ValueError):
    """The Telegram settings are incomplete or inconsistent (no secret is named)."""


#: The Bot API serves files up to 20 MB: the download cap whatever the bridge's own limit.
BOT_API_MAX_FILE_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TelegramConfig:
    """Everything the Telegram adapter needs; built by the bridge from its flags.

    Attributes:
        mode: ``polling`` (we call ``getUpdates``) or ``webhook`` (Telegram POSTs to us).
        token: the bot token from BotFather (secret: it is part of every API URL).
        base_url: where the Bot API lives; tests point it at a loopback fake.
        webhook_secret: the ``secret_token`` given to ``setWebhook``; required in webhook mode.
        group_mode: in groups answer only when addressed (``mention``) or every message (``all``).
        poll_timeout_s: ``getUpdates`` long-poll timeout (Telegram holds the request this long).
        max_image_bytes: largest image downloaded; the bridge sets it from its shared limit, at
            most :data:`BOT_API_MAX_FILE_BYTES` (the Bot API serves files up to 20 MB).
        max_body_bytes: largest webhook body accepted.
        sink_timeout_s: how long a webhook call waits for the sink before answering 503.
        edit_interval_s: least time between two edits in one chat (Telegram: about one a second).
        api_timeout_s: per-request timeout of API calls other than ``getUpdates``.
        api_max_attempts: tries per API call (429, 5xx and I/O errors are retried).
        rate_limit_max_wait_s: longest ``retry_after`` honoured; a longer one fails the call.
        identity_retry_s: how long to wait before asking ``getMe`` again after a refusal.
    """

    mode: Mode = "polling"
    token: str = ""
    base_url: str = "https://api.telegram.org"
    webhook_secret: str = ""
    group_mode: GroupMode = "mention"
    poll_timeout_s: int = 50
    max_image_bytes: int = BOT_API_MAX_FILE_BYTES
    max_body_bytes: int = 1_000_000
    sink_timeout_s: float = 5.0
    edit_interval_s: float = 1.0
    api_timeout_s: float = 15.0
    api_max_attempts: int = 4
    rate_limit_max_wait_s: float = 60.0
    identity_retry_s: float = 60.0

    def validate(self) -> None:
        """Check what the mode needs.

        Raises:
            ConfigError: something required is missing or out of range.
        """
        if self.mode not in ("polling", "webhook"):
            raise ConfigError(f"telegram mode must be polling or webhook, not {self.mode!r}")
        if not self.token or "/" in self.token or any(c.isspace() for c in self.token):
            raise ConfigError("telegram token is missing or malformed")
        if self.mode == "webhook" and not self.webhook_secret:
            raise ConfigError("telegram webhook mode needs a webhook secret")
        if self.group_mode not in ("mention", "all"):
            raise ConfigError("telegram group_mode must be mention or all")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("telegram base_url must be an http(s) URL")
        if self.poll_timeout_s < 0 or self.edit_interval_s < 0 or self.sink_timeout_s <= 0:
            raise ConfigError("telegram timeouts and intervals must not be negative")
        if self.api_max_attempts < 1:
            raise ConfigError("telegram api_max_attempts must be at least 1")

    @property
    def api_root(self) -> str:
        """``base_url`` without a trailing slash."""
        return self.base_url.rstrip("/")

    def __repr__(self) -> str:
        return masked_repr(self, _SECRET_FIELDS)

    __str__ = __repr__

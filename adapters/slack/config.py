"""Settings of the Slack adapter, with the two tokens masked in every printed form."""

from __future__ import annotations

from dataclasses import dataclass, fields
from urllib.parse import urlsplit

DEFAULT_BASE_URL = "https://slack.com/api"
#: Slack truncates ``text`` past 40,000 characters; answers are cut (with an ellipsis) below it.
SLACK_TEXT_LIMIT = 40_000
_SECRET_FIELDS = frozenset({"app_token", "bot_token"})


class ConfigError(ValueError):
    """The Slack settings are incomplete or inconsistent."""


@dataclass(frozen=True, slots=True)
class SlackConfig:
    """Everything the Slack adapter needs; built by the bridge from flags, env and file.

    Attributes:
        app_token: the app-level token (``xapp-...``, scope ``connections:write``; secret).
        bot_token: the bot token (``xoxb-...``; secret) for chat.* calls and file downloads.
        base_url: the Web API root (``https://slack.com/api``); tests point it at a fake.
        file_hosts: hosts the bot token may be sent to when downloading files; empty means
            ``files.slack.com`` for the real API, or the host of ``base_url`` for any other.
        max_image_bytes: largest file download accepted; the bridge sets it from its
            shared limit (``--max-image-bytes``).
        max_text_chars: answers longer than this are cut and end with an ellipsis.
        update_interval_s: least time between two ``chat.update`` calls of one message
            (Slack's chat.update is a Tier 3 method, about one call per second per message).
        api_timeout_s: per-request timeout of Web API calls.
        api_max_attempts: tries per Web API call (retries on 429/ratelimited, 5xx, I/O errors).
        api_backoff_base_s / api_backoff_max_s: jittered exponential backoff of those retries.
        rate_limit_max_wait_s: longest ``Retry-After`` waited out; a longer one fails the call.
        ping_interval_s: a socket silent this long gets a WebSocket ping from us.
        receive_deadline_s: a socket silent this long (no frame, not even a pong) is dropped.
        hello_timeout_s: how long a new socket may take to say ``hello``.
        reconnect_base_s / reconnect_max_s: jittered exponential backoff between connection tries.
        sink_timeout_s: how long one envelope may wait for the sink (Slack wants the ack in 3 s;
            past it the envelope stays unacked and Slack re-delivers it).
        max_envelope_bytes: largest socket message accepted.
    """

    app_token: str = ""
    bot_token: str = ""
    base_url: str = DEFAULT_BASE_URL
    file_hosts: tuple[str, ...] = ()
    max_image_bytes: int = 20 * 2**20
    max_text_chars: int = 39_000
    update_interval_s: float = 1.0
    api_timeout_s: float = 10.0
    api_max_attempts: int = 4
    api_backoff_base_s: float = 0.5
    api_backoff_max_s: float = 8.0
    rate_limit_max_wait_s: float = 60.0
    ping_interval_s: float = 10.0
    receive_deadline_s: float = 30.0
    hello_timeout_s: float = 10.0
    reconnect_base_s: float = 1.0
    reconnect_max_s: float = 60.0
    sink_timeout_s: float = 2.5
    max_envelope_bytes: int = 4 * 2**20

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "***"
            parts.append(f"{f.name}={value!r}")
        return f"SlackConfig({', '.join(parts)})"

    __str__ = __repr__

    @property
    def api_root(self) -> str:
        """``base_url`` without a trailing slash."""
        return self.base_url.rstrip("/")

    @property
    def allowed_file_hosts(self) -> frozenset[str]:
        """Hosts that may receive the bot token with a file download."""
        if self.file_hosts:
            return frozenset(h.lower() for h in self.file_hosts)
        if self.api_root == DEFAULT_BASE_URL:
            return frozenset({"files.slack.com"})
        return frozenset({(urlsplit(self.api_root).hostname or "").lower()})

    def validate(self) -> None:
        """Check the settings.

        Raises:
            ConfigError: a token is missing or malformed, or a number is out of range.
        """
        if not self.app_token:
            raise ConfigError("Slack Socket Mode needs the app-level token (xapp-...)")
        if not self.bot_token:
            raise ConfigError("Slack needs the bot token (xoxb-...)")
        if not self.app_token.startswith("xapp-"):
            raise ConfigError("the Slack app-level token must start with xapp-")
        if not self.bot_token.startswith("xoxb-"):
            raise ConfigError("the Slack bot token must start with xoxb-")
        if not self.api_root.startswith(("http://", "https://")):
            raise ConfigError("the Slack base URL must be http(s)://...")
        if not 1 <= self.max_text_chars <= SLACK_TEXT_LIMIT:
            raise ConfigError(f"max_text_chars must be within 1..{SLACK_TEXT_LIMIT}")
        if self.api_max_attempts < 1 or self.update_interval_s < 0:
            raise ConfigError("api_max_attempts must be >= 1 and update_interval_s >= 0")
        if not 0 < self.ping_interval_s < self.receive_deadline_s:
            raise ConfigError("need 0 < ping_interval_s < receive_deadline_s")
        if not 0 < self.reconnect_base_s <= self.reconnect_max_s:
            raise ConfigError("need 0 < reconnect_base_s <= reconnect_max_s")

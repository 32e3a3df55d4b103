"""The option table of ``bridge serve``: every setting's flag, parser, default and help line.

Each parser validates one value and raises :class:`ConfigError` with a one-line reason;
:mod:`bridge.config` reads the table from flags, the environment and a TOML file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.grants import parse_grant
from engine.limits import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_PROMPT_CHARS,
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and never echoes a secret."""


def _port(raw: object) -> int:
    try:
        value = int(str(raw), 10)
    except ValueError:
        raise ValueError(f"{raw!r} is not a port number (1-65535)") from None
    if not 1 <= value <= 65535:
        raise ValueError(f"{value} is out of range (1-65535)")
    return value


def _host(raw: object) -> str:
    text = str(raw).strip()
    if not text:
        raise ValueError("must not be empty")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ipaddress.ip_address(text)
    except ValueError:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
        if not set(text) <= allowed or len(text) > 253:
            raise ValueError(f"{raw!r} is not a host name or IP address") from None
    return text


def _int_range(lo: int, hi: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not an integer")
        try:
            value = int(str(raw), 10)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range ({lo}-{hi})")
        return value

    return parse


def _float_range(lo: float, hi: float) -> Callable[[object], float]:
    def parse(raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not a number")
        try:
            value = float(str(raw))
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not lo <= value <= hi or value != value:
            raise ValueError(f"{value:g} is out of range ({lo:g}-{hi:g})")
        return value

    return parse


def _choice(*options: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        text = str(raw).strip().lower()
        if text not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return text

    return parse


def _device(raw: object) -> str:
    text = str(raw).strip().lower()
    if text in ("auto", "cpu", "cuda", "mps"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ValueError(f"{raw!r} is not auto, cpu, cuda or cuda:N")


def _store(raw: object) -> str:
    text = str(raw).strip()
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return text
    if text.startswith(("redis://", "rediss://", "unix://")) and len(text.split("://", 1)[1]) > 0:
        return text
    if text == "memory://":
        return text
    raise ValueError("must be sqlite:///PATH, redis://HOST:PORT/DB or memory://")


def _text(raw: object) -> str:
    text = str(raw)
    if "\n" in text or "\x00" in text:
        raise ValueError("must be a single line")
    return text.strip()


def _optional_secret(raw: object) -> str | None:
    text = str(raw)
    if "\n" in text or "\x00" in text:
        raise ValueError("must be a single line")
    return text.strip() or None


def _tokens(raw: object) -> tuple[str, ...]:
    items: list[str] = []
    values = raw if isinstance(raw, list | tuple) else [raw]
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if part:
                if any(ch.isspace() or not ch.isprintable() for ch in part):
                    raise ValueError("a token must be printable and contain no spaces")
                if len(part) > 512:
                    raise ValueError("a token is longer than 512 characters")
                items.append(part)
    return tuple(dict.fromkeys(items))


def _topic_grants(raw: object) -> tuple[tuple[str, str], ...]:
    """``TOKEN=PATTERN`` items (a list, or comma-separated text) as (token, pattern) pairs."""
    items: list[tuple[str, str]] = []
    values = raw if isinstance(raw, list | tuple) else [raw]
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if part:
                items.append(parse_grant(part))
    return tuple(dict.fromkeys(items))


def _byte_size(lo: int, hi: int) -> Callable[[object], int]:
    """A byte count: an integer, or one with a ``KiB``/``MiB``/``GiB`` suffix (``256MiB``)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "k": 2**10, "m": 2**20, "g": 2**30}

    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not a byte count")
        text = str(raw).strip().lower().replace("_", "")
        scale = 1
        for suffix, size in units.items():
            if text.endswith(suffix) and text[: -len(suffix)].strip().isdigit():
                text, scale = text[: -len(suffix)].strip(), size
                break
        if not text.isdigit():
            raise ValueError(f"{raw!r} is not a byte count (e.g. 268435456 or 256MiB)")
        value = int(text, 10) * scale
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range ({lo}-{hi})")
        return value

    return parse


def _switch(raw: object) -> bool:
    """A yes/no value: true/false, yes/no, on/off, 1/0 (a bare flag means true)."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw!r} is not true or false")


def _base_url(raw: object) -> str:
    text = str(raw).strip().rstrip("/")
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise ValueError(f"{raw!r} is not an http(s) URL")
    return text


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its flag, parser, default and help line."""

    name: str
    parse: Callable[[object], Any]
    default: Any
    help: str
    secret: bool = False
    repeatable: bool = False
    #: A yes/no option: the bare flag means true (``--model-load-retry``).
    switch: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return "BRIDGE_" + self.name.upper().replace("-", "_")

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("host", _host, "127.0.0.1", "listen address"),
    Option("port", _port, 8080, "listen port (HTTP and WebSocket)"),
    Option("model", _text, "tiny", "tiny, a local model folder, or a Hugging Face model id"),
    Option(
        "model-load-retry",
        _switch,
        False,
        "keep retrying a model that fails to load, with backoff, instead of exiting",
        switch=True,
    ),
    Option("device", _device, "auto", "auto, cpu, cuda, cuda:N"),
    Option("dtype", _choice("auto", "float32", "bfloat16", "float16"), "auto", "model dtype"),
    Option("max-batch", _int_range(1, 256), 8, "jobs per batched generate call"),
    Option("batch-wait-ms", _float_range(0, 10_000), 10.0, "how long to gather a batch"),
    Option(
        "batching",
        _choice("static", "continuous", "auto"),
        "auto",
        "static batches, or admit jobs between decode steps (continuous; auto: where verified)",
    ),
    Option("queue-size", _int_range(1, 1_000_000), 256, "pending jobs before 'busy'"),
    Option("max-new-tokens", _int_range(1, 32_768), 256, "cap on generated tokens per job"),
    Option("job-timeout", _float_range(0.1, 86_400), 120.0, "seconds before a job fails"),
    Option(
        "shared-cache-ttl",
        _float_range(0, 30 * 86_400),
        3600.0,
        "seconds a finished answer is shared with every node on a Redis store (0: off)",
    ),
    Option(
        "shared-cache-max-bytes",
        _byte_size(2**16, 2**40),
        256 * 2**20,
        "bound on the bytes of the answers shared on Redis (least recently used go first)",
    ),
    Option(
        "vision-cache-bytes",
        _byte_size(0, 2**40),
        256 * 2**20,
        "bound on cached vision-tower outputs, so another question about the same image skips "
        "decoding and the vision encoder (0: off)",
    ),
    Option("store", _store, "sqlite:///var/bridge.db", "sqlite:///PATH, redis://... or memory://"),
    Option("heartbeat", _float_range(0.01, 3600), 45.0, "seconds between server pings"),
    Option("heartbeat-timeout", _float_range(0.01, 3600), 10.0, "seconds to wait for a pong"),
    Option("token", _tokens, (), "client token for /ws (repeatable)", secret=True, repeatable=True),
    Option(
        "token-submit-rate",
        _float_range(0, 100_000),
        50.0,
        "submits per second per client token across all nodes (0: no limit)",
    ),
    Option(
        "topic-grant",
        _topic_grants,
        (),
        "TOKEN=PATTERN: the client token may subscribe to chat topics matching the glob "
        "(repeatable)",
        secret=True,
        repeatable=True,
    ),
    Option(
        "max-inflight-bytes",
        _byte_size(2**20, 2**40),
        256 * 2**20,
        "bytes of inbound /ws frames being received, decoded or waiting for the engine, over "
        "all connections; a large submit beyond it gets 'busy'",
    ),
    # -- size limits: one engine.limits.Limits, read by /ws, the HTTP API, IM downloads, engine --
    Option(
        "max-image-bytes",
        _byte_size(2**10, 2**32),
        DEFAULT_MAX_IMAGE_BYTES,
        "largest image anywhere: /ws and HTTP submits, IM downloads (or the platform's own lower "
        "cap), the engine",
    ),
    Option(
        "max-image-pixels",
        _int_range(1, 10**10),
        DEFAULT_MAX_IMAGE_PIXELS,
        "largest width x height (from the image header) the engine decodes",
    ),
    Option("max-prompt-chars", _int_range(1, 10**7), DEFAULT_MAX_PROMPT_CHARS, "longest prompt"),
    Option(
        "max-frame-bytes",
        _byte_size(0, 2**34),
        0,
        "largest inbound /ws frame (0: just large enough for max-image-bytes and the prompt)",
    ),
    Option("admin-token", _optional_secret, None, "token for /dashboard and /api/*", secret=True),
    Option("feishu-mode", _choice("off", "webhook", "longconn"), "off", "off, webhook, longconn"),
    Option("feishu-app-id", _text, "", "the Feishu bot's App ID"),
    Option("feishu-app-secret", _optional_secret, None, "the bot's App Secret", secret=True),
    Option(
        "feishu-verification-token",
        _optional_secret,
        None,
        "event subscription Verification Token",
        secret=True,
    ),
    Option("feishu-encrypt-key", _optional_secret, None, "event Encrypt Key", secret=True),
    Option("feishu-base-url", _base_url, "https://open.feishu.cn", "Feishu OpenAPI base URL"),
    # -- Slack options (bridge/platforms/slack.py) --
    Option("slack-mode", _choice("off", "socket"), "off", "off, socket (Slack Socket Mode)"),
    Option(
        "slack-app-token",
        _optional_secret,
        None,
        "app-level token xapp-... (Socket Mode)",
        secret=True,
    ),
    Option("slack-bot-token", _optional_secret, None, "bot token xoxb-...", secret=True),
    Option("slack-base-url", _base_url, "https://slack.com/api", "Slack Web API base URL"),
    # -- Telegram options (bridge/platforms/telegram.py) --
    Option("telegram-mode", _choice("off", "polling", "webhook"), "off", "off, polling, webhook"),
    Option("telegram-token", _optional_secret, None, "the bot token from BotFather", secret=True),
    Option("telegram-base-url", _base_url, "https://api.telegram.org", "Telegram Bot API URL"),
    Option(
        "telegram-webhook-secret",
        _optional_secret,
        None,
        "setWebhook secret_token, checked on every webhook call",
        secret=True,
    ),
    Option("telegram-group-mode", _choice("mention", "all"), "mention", "groups: mention or all"),
    # -- DingTalk options (bridge/platforms/dingtalk.py) --
    Option("dingtalk-mode", _choice("off", "stream"), "off", "off, stream"),
    Option("dingtalk-client-id", _text, "", "the DingTalk app's Client ID (AppKey)"),
    Option(
        "dingtalk-client-secret",
        _optional_secret,
        None,
        "the DingTalk app's Client Secret (AppSecret)",
        secret=True,
    ),
    Option("dingtalk-base-url", _base_url, "https://api.dingtalk.com", "DingTalk OpenAPI base URL"),
    Option(
        "dingtalk-card-template-id",
        _text,
        "",
        "an AI card template id: answers stream in that card (empty: one final message)",
    ),
    Option(
        "dingtalk-card-content-key", _text, "content", "the card template's streamed text variable"
    ),
    # -- WeCom options (bridge/platforms/wecom.py) --
    Option("wecom-mode", _choice("off", "webhook"), "off", "off, webhook (WeCom callback mode)"),
    Option("wecom-corp-id", _text, "", "the WeCom CorpID (also the callback's receive id)"),
    Option("wecom-agent-id", _text, "", "the self-built app's AgentId"),
    Option("wecom-secret", _optional_secret, None, "the self-built app's Secret", secret=True),
    Option("wecom-token", _optional_secret, None, "the callback Token", secret=True),
    Option(
        "wecom-aes-key",
        _optional_secret,
        None,
        "the callback EncodingAESKey (43 characters)",
        secret=True,
    ),
    Option("wecom-base-url", _base_url, "https://qyapi.weixin.qq.com", "WeCom API base URL"),
    # -- HTTP API options (bridge/http/) --
    Option(
        "http-image-hosts",
        lambda raw: tuple(dict.fromkeys(_host(h).lower() for h in _tokens(raw))),
        (),
        "hosts whose http(s) image_url the HTTP API may fetch (comma list; default none)",
    ),
    Option("grace", _float_range(0, 600), 10.0, "seconds to drain on SIGTERM/SIGINT"),
    Option(
        "cluster-lease",
        _float_range(1, 3600),
        60.0,
        "seconds before another node may take over a dead node's IM job (Redis store)",
    ),
    Option("log-level", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Option("log-format", _choice("auto", "json", "console"), "auto", "log line format"),
)
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}

"""Settings of ``bridge serve``: one table of options, from flags, env, a TOML file, defaults.

Precedence is flag > environment (``BRIDGE_<NAME>``) > ``--config`` file > default. Every value is
validated here, so a bad one becomes a one-line :class:`ConfigError` instead of a traceback later.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from bridge.options import OPTIONS, OPTIONS_BY_NAME, ConfigError, Option

__all__ = ["OPTIONS", "ConfigError", "Option", "Settings", "load_settings", "option_names"]
from engine.limits import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_PROMPT_CHARS,
    Limits,
)


@dataclass(frozen=True)
class Settings:
    """Validated settings of one ``bridge serve`` process (see :data:`OPTIONS`)."""

    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "tiny"
    model_load_retry: bool = False
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    batching: str = "auto"
    queue_size: int = 256
    max_new_tokens: int = 256
    job_timeout: float = 120.0
    shared_cache_ttl: float = 3600.0
    shared_cache_max_bytes: int = 256 * 2**20
    vision_cache_bytes: int = 256 * 2**20
    store: str = "sqlite:///var/bridge.db"
    heartbeat: float = 45.0
    heartbeat_timeout: float = 10.0
    token: tuple[str, ...] = ()
    token_submit_rate: float = 50.0
    topic_grant: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_inflight_bytes: int = 256 * 2**20
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_frame_bytes: int = 0
    admin_token: str | None = None
    feishu_mode: str = "off"
    feishu_app_id: str = ""
    feishu_app_secret: str | None = field(default=None, repr=False)
    feishu_verification_token: str | None = field(default=None, repr=False)
    feishu_encrypt_key: str | None = field(default=None, repr=False)
    feishu_base_url: str = "https://open.feishu.cn"
    # -- Slack settings --
    slack_mode: str = "off"
    slack_app_token: str | None = field(default=None, repr=False)
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_base_url: str = "https://slack.com/api"

    # -- Telegram settings --
    telegram_mode: str = "off"
    telegram_token: str | None = field(default=None, repr=False)
    telegram_base_url: str = "https://api.telegram.org"
    telegram_webhook_secret: str | None = field(default=None, repr=False)
    telegram_group_mode: str = "mention"

    # -- DingTalk settings --
    dingtalk_mode: str = "off"
    dingtalk_client_id: str = ""
    dingtalk_client_secret: str | None = field(default=None, repr=False)
    dingtalk_base_url: str = "https://api.dingtalk.com"
    dingtalk_card_template_id: str = ""
    dingtalk_card_content_key: str = "content"

    # -- WeCom settings --
    wecom_mode: str = "off"
    wecom_corp_id: str = ""
    wecom_agent_id: str = ""
    wecom_secret: str | None = field(default=None, repr=False)
    wecom_token: str | None = field(default=None, repr=False)
    wecom_aes_key: str | None = field(default=None, repr=False)
    wecom_base_url: str = "https://qyapi.weixin.qq.com"

    # -- HTTP API settings --
    http_image_hosts: tuple[str, ...] = ()

    grace: float = 10.0
    cluster_lease: float = 60.0
    log_level: str = "info"
    log_format: str = "auto"

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            opt = OPTIONS_BY_NAME[f.name.replace("_", "-")]
            if opt.secret and value:
                value = "***"
            parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    @cached_property
    def limits(self) -> Limits:
        """The process's one :class:`~engine.limits.Limits`, built once; every entry point reads it.

        Raises:
            ValueError: ``max_frame_bytes`` too small for ``max_image_bytes``.
        """
        return Limits(
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            max_prompt_chars=self.max_prompt_chars,
            max_frame_bytes=self.max_frame_bytes,
        )

    def public(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked, safe for logs and the dashboard."""
        out: dict[str, Any] = {}
        for opt in OPTIONS:
            value = getattr(self, opt.attr)
            out[opt.attr] = ("***" if value else value) if opt.secret else value
        return out


def _read_toml(path: str) -> dict[str, Any]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    # Allow the options either at top level or under [bridge].
    section = table.get("bridge")
    if isinstance(section, dict):
        table = {**{k: v for k, v in table.items() if k != "bridge"}, **section}
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name not in OPTIONS_BY_NAME:
            raise ConfigError(f"--config: {path}: unknown key {key!r}")
        if isinstance(value, dict):
            raise ConfigError(f"--config: {path}: {key} must be a value, not a table")
        out[name] = value
    return out


def load_settings(
    flags: Mapping[str, object],
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Merge flags, environment, file and defaults into validated :class:`Settings`.

    Args:
        flags: option name (``max-batch``) → raw value given on the command line (absent = unset).
        env: the environment to read ``BRIDGE_*`` variables from (default ``os.environ``).
        config_file: a TOML file path; ``BRIDGE_CONFIG`` is used when None.

    Raises:
        ConfigError: a value is invalid or the file cannot be read; the message is one line.
    """
    env = os.environ if env is None else env
    path = config_file or env.get("BRIDGE_CONFIG") or None
    from_file = _read_toml(path) if path else {}
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw: object
        if opt.name in flags and flags[opt.name] is not None:
            raw, origin = flags[opt.name], opt.flag
        elif opt.env in env:
            raw, origin = env[opt.env], opt.env
        elif opt.name in from_file:
            raw, origin = from_file[opt.name], f"{path}: {opt.name}"
        else:
            values[opt.attr] = opt.default
            continue
        try:
            values[opt.attr] = opt.parse(raw)
        except ValueError as exc:
            detail = "invalid value" if opt.secret else str(exc)
            raise ConfigError(f"{origin}: {detail}") from None
    settings = Settings(**values)
    _check_combinations(settings)
    return settings


def _check_combinations(s: Settings) -> None:
    try:
        s.limits  # noqa: B018 - built (and so validated) once, here
    except ValueError as exc:
        raise ConfigError(f"--max-frame-bytes: {exc}") from None
    known = set(s.token) | ({s.admin_token} if s.admin_token else set())
    unknown = sum(1 for token, _ in s.topic_grant if token not in known)
    if unknown:
        # The token is never echoed: say how many grants and which patterns.
        patterns = ", ".join(repr(p) for t, p in s.topic_grant if t not in known)
        raise ConfigError(
            f"--topic-grant: {unknown} grant(s) ({patterns}) name a token that is not a --token"
        )
    from bridge.platforms import check_settings

    check_settings(s)


def option_names() -> Sequence[str]:
    """All option names, for the CLI and the docs table."""
    return [o.name for o in OPTIONS]

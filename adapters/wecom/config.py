"""Settings of the WeCom adapter, with secrets masked in every printed form."""

from __future__ import annotations

from dataclasses import dataclass, fields

from adapters.wecom.crypto import CryptoError, decode_aes_key

_SECRET_FIELDS = frozenset({"secret", "token", "aes_key"})


class ConfigError(ValueError):
    """The WeCom settings are incomplete or inconsistent (no secret is named)."""


@dataclass(frozen=True, slots=True)
class WeComConfig:
    """Everything the WeCom adapter needs; built by the bridge from flags, env and file.

    Attributes:
        corp_id: the CorpID (``ww...``); also the receive id inside every callback ciphertext.
        agent_id: the self-built app's AgentId (a number, as text).
        secret: the app's Secret, for ``gettoken`` (secret).
        token: the callback Token that signs callbacks (secret).
        aes_key: the callback EncodingAESKey, 43 characters (secret).
        base_url: where the API lives; tests point it at a loopback fake.
        max_body_bytes: largest callback body accepted.
        sink_timeout_s: how long a callback waits for the sink before answering 503 (WeCom gives
            up after 5 s and retries).
        max_image_bytes: largest ``media/get`` download accepted; the bridge sets it from its
            shared limit (``--max-image-bytes``).
        api_timeout_s: per-request timeout of API calls.
        api_max_attempts: tries per API call on rate limits (45009, HTTP 429), 5xx and I/O errors.
        api_backoff_base_s / api_backoff_max_s: exponential backoff of those retries (jittered).
        token_refresh_margin_s: fetch a new access token this long before ``expires_in`` ends.
        placeholder: the text sent when a photo's job starts (WeCom cannot edit a sent text).
        max_parts: an answer longer than one 2048-byte text goes out in at most this many texts.
    """

    corp_id: str = ""
    agent_id: str = ""
    secret: str = ""
    token: str = ""
    aes_key: str = ""
    base_url: str = "https://qyapi.weixin.qq.com"
    max_body_bytes: int = 256 * 1024
    sink_timeout_s: float = 3.0
    max_image_bytes: int = 20 * 1024 * 1024
    api_timeout_s: float = 10.0
    api_max_attempts: int = 4
    api_backoff_base_s: float = 0.5
    api_backoff_max_s: float = 8.0
    token_refresh_margin_s: float = 300.0
    placeholder: str = "Looking at your photo…"
    max_parts: int = 4

    def validate(self) -> None:
        """Check the settings.

        Raises:
            ConfigError: something required is missing or out of range.
        """
        missing = [
            name
            for name in ("corp_id", "agent_id", "secret", "token", "aes_key")
            if not getattr(self, name)
        ]
        if missing:
            raise ConfigError(f"wecom needs {', '.join(missing)}")
        if not self.agent_id.isdigit():
            raise ConfigError("wecom agent_id must be a number")
        try:
            decode_aes_key(self.aes_key)
        except CryptoError as exc:
            raise ConfigError(f"wecom aes_key: {exc}") from None
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("wecom base_url must be an http(s) URL")
        if self.sink_timeout_s <= 0 or self.api_max_attempts < 1 or self.max_parts < 1:
            raise ConfigError("wecom timeouts, attempts and parts must be positive")

    @property
    def api_root(self) -> str:
        """``base_url`` without a trailing slash."""
        return self.base_url.rstrip("/")

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = ("'***'" if value else "''") if f.name in _SECRET_FIELDS else repr(value)
            parts.append(f"{f.name}={shown}")
        return f"WeComConfig({', '.join(parts)})"

    __str__ = __repr__

"""The I/O-free webhook core: verifies, decrypts and classifies one Feishu callback request.

Checks run cheapest-and-safest first on the raw bytes: size, signature and timestamp (when an
Encrypt Key is configured), then decryption, JSON, and the verification token. A refused request
never yields a message, so nothing downstream (store, download, model) can be reached by it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from adapters.base import InboundMessage
from adapters.feishu.config import FeishuConfig
from adapters.feishu.crypto import AESCipher, DecryptError, same_secret, verify_signature
from adapters.feishu.events import MESSAGE_RECEIVE, EventFormatError, parse_envelope, to_inbound

DecisionKind = Literal["challenge", "message", "ignored", "rejected"]

H_TIMESTAMP = "x-lark-request-timestamp"
H_NONCE = "x-lark-request-nonce"
H_SIGNATURE = "x-lark-signature"


@dataclass(frozen=True, slots=True)
class WebhookDecision:
    """What to do with one callback request.

    Attributes:
        kind: ``challenge`` (answer the URL check), ``message`` (hand ``message`` to the sink),
            ``ignored`` (authentic but not for us: 200) or ``rejected`` (refuse with ``status``).
        status: the HTTP status to answer (for ``message``: the status if the sink succeeds).
        body: the JSON body to answer.
        message: the parsed message for ``message`` decisions.
        reason: a short, secret-free reason for logs.
        event_id: the delivery's event id when known (for logs).
    """

    kind: DecisionKind
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    message: InboundMessage | None = None
    reason: str = ""
    event_id: str = ""


def _reject(status: int, code: str, message: str) -> WebhookDecision:
    return WebhookDecision(
        kind="rejected",
        status=status,
        body={"error": {"code": code, "message": message}},
        reason=code,
    )


class WebhookVerifier:
    """Classifies callback requests for one app's secrets; pure apart from the injected clock."""

    def __init__(self, config: FeishuConfig, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._cipher = AESCipher(config.encrypt_key) if config.encrypt_key else None

    def __repr__(self) -> str:
        return "WebhookVerifier(secrets='***')"

    def process(self, headers: Mapping[str, str], body: bytes) -> WebhookDecision:
        """Verify and classify one request; never raises on bad input."""
        cfg = self._config
        if len(body) > cfg.max_body_bytes:
            return _reject(400, "too_large", f"body larger than {cfg.max_body_bytes} bytes")
        hdrs = {k.lower(): v for k, v in headers.items()}
        # With an Encrypt Key every event must be signed. The URL check may come unsigned (the
        # official SDKs answer it before looking at the signature): it is answered only if it
        # was encrypted with our key and carries our token, which an outsider cannot produce.
        signed = bool(hdrs.get(H_TIMESTAMP) or hdrs.get(H_SIGNATURE))
        if self._cipher is not None and signed:
            refused = self._check_signature(hdrs, body)
            if refused is not None:
                return refused
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _reject(400, "bad_json", "body is not JSON")
        if not isinstance(data, dict):
            return _reject(400, "bad_json", "body is not a JSON object")
        if "encrypt" in data:
            if self._cipher is None:
                return _reject(400, "not_configured", "encrypted body but no Encrypt Key is set")
            encrypted = data["encrypt"]
            if not isinstance(encrypted, str):
                return _reject(400, "bad_json", "encrypt is not a string")
            try:
                data = json.loads(self._cipher.decrypt(encrypted))
            except DecryptError as exc:
                return _reject(401, "undecryptable", str(exc))
            except (ValueError, UnicodeDecodeError):
                return _reject(400, "bad_json", "decrypted body is not JSON")
            if not isinstance(data, dict):
                return _reject(400, "bad_json", "decrypted body is not a JSON object")
            decision = self._classify(data)
            if not signed and decision.kind != "challenge":
                return _reject(401, "unsigned", "signature headers are missing")
            return decision
        if self._cipher is not None and not signed:
            return _reject(401, "unsigned", "signature headers are missing")
        return self._classify(data)

    def _check_signature(self, hdrs: Mapping[str, str], body: bytes) -> WebhookDecision | None:
        timestamp = hdrs.get(H_TIMESTAMP, "")
        nonce = hdrs.get(H_NONCE, "")
        received = hdrs.get(H_SIGNATURE, "")
        if not (timestamp and received):
            return _reject(401, "unsigned", "signature headers are missing")
        assert self._config.encrypt_key
        if not verify_signature(timestamp, nonce, self._config.encrypt_key, body, received):
            return _reject(401, "bad_signature", "signature does not match")
        try:
            sent_at = float(int(timestamp))
        except ValueError:
            return _reject(401, "bad_timestamp", "timestamp is not an integer")
        if abs(self._clock() - sent_at) > self._config.replay_window_s:
            return _reject(401, "stale", "timestamp outside the replay window")
        return None

    def _token_ok(self, token: object) -> bool:
        expected = self._config.verification_token
        if not expected:
            return True  # only the signature protects this app (checked before)
        return isinstance(token, str) and same_secret(token, expected)

    def _classify(self, data: dict[str, Any]) -> WebhookDecision:
        if data.get("type") == "url_verification":
            if not self._token_ok(data.get("token")):
                return _reject(403, "bad_token", "verification token does not match")
            challenge = data.get("challenge")
            if not isinstance(challenge, str):
                return _reject(400, "bad_json", "url_verification without a challenge")
            return WebhookDecision(kind="challenge", status=200, body={"challenge": challenge})
        try:
            envelope = parse_envelope(data)
        except EventFormatError as exc:
            return _reject(400, "bad_event", str(exc))
        if not self._token_ok(envelope.token):
            return _reject(403, "bad_token", "verification token does not match")
        if envelope.event_type != MESSAGE_RECEIVE:
            return WebhookDecision(
                kind="ignored",
                status=200,
                body={"code": 0, "msg": "ignored"},
                reason=f"event_type {envelope.event_type[:64]}",
                event_id=envelope.event_id,
            )
        try:
            message = to_inbound(envelope, received_at=self._clock())
        except EventFormatError as exc:
            return _reject(400, "bad_event", str(exc))
        return WebhookDecision(
            kind="message",
            status=200,
            body={"code": 0, "msg": "ok"},
            message=message,
            event_id=envelope.event_id,
        )

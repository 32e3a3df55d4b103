"""The I/O-free callback core: verifies, decrypts and classifies WeCom callback requests.

``GET`` is the URL check (``msg_signature``, ``timestamp``, ``nonce``, ``echostr``: answer the
decrypted echostr). ``POST`` carries ``<xml><ToUserName/><AgentID/><Encrypt/></xml>``; the
signature covers the Encrypt value. Checks run cheapest first (size, parameters, signature), so a
refused request never reaches the XML parser of the inner message, the store or the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from adapters.base import InboundMessage
from adapters.wecom.config import WeComConfig
from adapters.wecom.crypto import CryptoError, WeComCrypto
from adapters.wecom.xmlmsg import XmlFormatError, parse_flat_xml, to_inbound

Kind = Literal["echo", "message", "ignored", "rejected"]


@dataclass(frozen=True, slots=True)
class CallbackDecision:
    """What to answer one callback request.

    Attributes:
        kind: ``echo`` (URL check passed: answer ``text``), ``message`` (hand ``message`` to the
            sink, then answer ``text``), ``ignored`` (authentic but not for us) or ``rejected``.
        status: the HTTP status to answer (for ``message``: if the sink succeeds).
        text: the text/plain body.
        message: the parsed message for ``message`` decisions.
        reason: a short, secret-free reason for logs.
    """

    kind: Kind
    status: int
    text: str = ""
    message: InboundMessage | None = None
    reason: str = ""


def _reject(status: int, reason: str) -> CallbackDecision:
    return CallbackDecision(kind="rejected", status=status, text=reason, reason=reason)


class CallbackCore:
    """Classifies callback requests for one app's secrets; pure apart from the injected clock."""

    def __init__(self, config: WeComConfig, clock: Callable[[], float]) -> None:
        self._cfg = config
        self._clock = clock
        self._crypto = WeComCrypto(config.token, config.aes_key, config.corp_id)

    def __repr__(self) -> str:
        return "CallbackCore(secrets='***')"

    def url_check(self, query: Mapping[str, str]) -> CallbackDecision:
        """Answer the URL check: verify the signature over echostr, answer its plaintext."""
        sig, ts, nonce = _params(query)
        # Base64 has no spaces: a "+" that reached us unescaped was decoded to " " on the way.
        echostr = query.get("echostr", "").replace(" ", "+")
        if not (sig and ts and echostr):
            return _reject(400, "missing msg_signature, timestamp or echostr")
        try:
            self._crypto.verify(sig, ts, nonce, echostr)
            plain = self._crypto.decrypt(echostr)
            text = plain.decode("utf-8")
        except CryptoError as exc:
            return _reject(403, str(exc))
        except UnicodeDecodeError:
            return _reject(403, "echostr is not UTF-8")
        return CallbackDecision(kind="echo", status=200, text=text)

    def message(self, query: Mapping[str, str], body: bytes) -> CallbackDecision:
        """Verify and classify one POSTed callback; never raises on bad input."""
        if len(body) > self._cfg.max_body_bytes:
            return _reject(413, f"body larger than {self._cfg.max_body_bytes} bytes")
        sig, ts, nonce = _params(query)
        if not (sig and ts):
            return _reject(400, "missing msg_signature or timestamp")
        try:
            outer = parse_flat_xml(body)
        except XmlFormatError as exc:
            return _reject(400, str(exc))
        encrypted = outer.get("Encrypt", "").strip()
        if not encrypted:
            return _reject(400, "body lacks Encrypt")
        try:
            self._crypto.verify(sig, ts, nonce, encrypted)
            inner_xml = self._crypto.decrypt(encrypted)
        except CryptoError as exc:
            return _reject(403, str(exc))
        try:
            inner = parse_flat_xml(inner_xml)
            agent = inner.get("AgentID", "").strip()
            if agent and agent != self._cfg.agent_id:
                return CallbackDecision(kind="ignored", status=200, reason="another AgentID")
            message = to_inbound(inner, received_at=self._clock())
        except XmlFormatError as exc:
            return _reject(400, f"decrypted message: {exc}")
        if message is None:
            event = inner.get("Event", "")[:64]
            return CallbackDecision(kind="ignored", status=200, reason=f"event {event}")
        return CallbackDecision(kind="message", status=200, message=message)


def _params(query: Mapping[str, str]) -> tuple[str, str, str]:
    return (
        query.get("msg_signature", ""),
        query.get("timestamp", ""),
        query.get("nonce", ""),
    )

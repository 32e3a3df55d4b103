"""Platform-neutral vocabulary of IM adapters: inbound messages, replies, status and the sink.

Every IM platform (Feishu first; DingTalk, Slack, Telegram, WeCom later) turns its traffic into
:class:`InboundMessage` and answers through :class:`ReplyStream`, so the bridge's relay never
changes when a platform is added. Nothing here imports the bridge or the engine.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

EventOutcome = Literal["accepted", "duplicate", "rejected"]


class AdapterError(Exception):
    """A platform operation failed; the message is safe to log (never carries secrets)."""


class ImageFetchError(AdapterError):
    """An image could not be downloaded (missing, too large, refused): answer with an apology."""


class ReplyError(AdapterError):
    """A reply could not be posted or updated after retries."""


class MessageFormatError(ValueError):
    """A serialized :class:`InboundMessage` could not be decoded."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A reference to an image attached to a message, fetched later with ``Adapter.fetch_image``.

    Attributes:
        key: the platform's key for the resource (Feishu: ``image_key``).
        kind: the resource kind the platform needs to fetch it (Feishu: ``image``).
    """

    key: str
    kind: str = "image"


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One user message in the bridge's own words, independent of the platform it came from.

    Attributes:
        platform: ``"feishu"``, later ``"dingtalk"``, ``"slack"``, ...
        chat_id: the conversation the answer goes to (also the hub topic ``chat:<platform>:<id>``).
        message_id: the platform's id of this message; the dedupe key the platform recommends.
        event_id: the platform's id of the delivery event (a second dedupe key; may be empty).
        sender_id: who sent it (Feishu: open_id); for logs and policies, not for auth.
        text: the plain text of the message (mention placeholders removed); may be empty.
        images: attached images in message order.
        message_type: the platform's message type (``image``, ``post``, ``text``, ...).
        received_at: wall-clock seconds when the adapter accepted it.
        chat_type: ``p2p`` or ``group`` where the platform says so, else empty.
    """

    platform: str
    chat_id: str
    message_id: str
    event_id: str
    sender_id: str
    text: str
    images: tuple[ImageRef, ...]
    message_type: str
    received_at: float
    chat_type: str = ""

    @property
    def topic(self) -> str:
        """The hub topic that sessions subscribe to for this chat."""
        return f"chat:{self.platform}:{self.chat_id}"

    @property
    def dedupe_keys(self) -> tuple[str, ...]:
        """Store keys to claim for at-least-once delivery (message id first, event id if any)."""
        keys = [f"{self.platform}:msg:{self.message_id}"]
        if self.event_id:
            keys.append(f"{self.platform}:evt:{self.event_id}")
        return tuple(keys)

    def to_json(self) -> str:
        """Serialize for the durable inbox (compact, stable key order)."""
        data: dict[str, Any] = {
            "v": 1,
            "platform": self.platform,
            "chat_id": self.chat_id,
            "message_id": self.message_id,
            "event_id": self.event_id,
            "sender_id": self.sender_id,
            "text": self.text,
            "images": [{"key": r.key, "kind": r.kind} for r in self.images],
            "message_type": self.message_type,
            "received_at": self.received_at,
            "chat_type": self.chat_type,
        }
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> InboundMessage:
        """Rebuild a message written by :meth:`to_json`.

        Raises:
            MessageFormatError: the text is not a serialized message.
        """
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            images = tuple(
                ImageRef(key=_str(i["key"]), kind=_str(i.get("kind", "image")))
                for i in data.get("images", [])
            )
            return cls(
                platform=_str(data["platform"]),
                chat_id=_str(data["chat_id"]),
                message_id=_str(data["message_id"]),
                event_id=_str(data.get("event_id", "")),
                sender_id=_str(data.get("sender_id", "")),
                text=_str(data.get("text", "")),
                images=images,
                message_type=_str(data.get("message_type", "")),
                received_at=float(data.get("received_at", 0.0)),
                chat_type=_str(data.get("chat_type", "")),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise MessageFormatError(f"not a serialized InboundMessage: {exc}") from None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


MessageSink = Callable[[InboundMessage], Awaitable[bool]]
"""The bridge's intake: durably records and dedupes a message (on message id and event id).

Returns True if the message is new, False if it is a duplicate. Raises if it could not record it;
the adapter then does not acknowledge the delivery (webhook: 5xx; long connection: no 200), so the
platform delivers it again.
"""


@dataclass(frozen=True, slots=True)
class AdapterStatus:
    """What the dashboard and ``/readyz`` show about one adapter; never holds secrets.

    Attributes:
        platform: ``"feishu"``, ...
        mode: ``"webhook"``, ``"longconn"``, ``"off"``.
        state: ``"off"``, ``"listening"`` (webhook), ``"connecting"``, ``"connected"``,
            ``"reconnecting"``, ``"failed"`` (gave up) or ``"stopped"``.
        healthy: whether the adapter can receive messages now (``/readyz`` may require it).
        since: wall-clock seconds when ``state`` was entered.
        attempts: consecutive failed connection attempts (0 when connected).
        last_event_at: wall-clock seconds of the last accepted platform event, or None.
        last_error: a short, secret-free description of the last failure, or None.
        events: counts by outcome (accepted, duplicate, rejected).
        api_errors: platform API calls that failed permanently.
    """

    platform: str
    mode: str
    state: str
    healthy: bool
    since: float
    attempts: int = 0
    last_event_at: float | None = None
    last_error: str | None = None
    events: Mapping[str, int] = field(default_factory=dict)
    api_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the dashboard and ``/readyz``."""
        return {
            "platform": self.platform,
            "mode": self.mode,
            "state": self.state,
            "healthy": self.healthy,
            "since": self.since,
            "attempts": self.attempts,
            "last_event_at": self.last_event_at,
            "last_error": self.last_error,
            "events": dict(self.events),
            "api_errors": self.api_errors,
        }


@runtime_checkable
class ReplyStream(Protocol):
    """A reply that grows as the model writes: one posted message, then coalesced updates."""

    @property
    def reply_message_id(self) -> str:
        """The platform's id of the posted reply."""
        ...

    async def update(self, text_so_far: str) -> None:
        """Show the answer so far; cheap and non-blocking (updates are coalesced)."""
        ...

    async def finish(self, final_text: str) -> None:
        """Show the final answer and close the stream.

        Raises:
            ReplyError: the final update could not be delivered.
        """
        ...

    async def fail(self, apology: str) -> None:
        """Replace the reply with a short apology and close the stream.

        Raises:
            ReplyError: the update could not be delivered.
        """
        ...


class AdapterObserver(Protocol):
    """Receives counts for metrics (``bridge_feishu_events_total{outcome}``); must not block."""

    def on_event(self, outcome: EventOutcome) -> None:
        """One platform delivery was accepted, recognised as a duplicate, or rejected."""
        ...


@dataclass(frozen=True, slots=True)
class WebhookResponse:
    """What an HTTP callback handler answers: a status and a JSON body."""

    status: int
    body: dict[str, Any]


@runtime_checkable
class Adapter(Protocol):
    """One IM platform as the bridge sees it."""

    platform: str

    async def start(self, sink: MessageSink) -> None:
        """Begin receiving (connect out, or get ready for webhook calls); returns promptly."""
        ...

    async def stop(self) -> None:
        """Stop receiving, cancel background tasks and release connections."""
        ...

    async def fetch_image(self, msg: InboundMessage, ref: ImageRef) -> bytes:
        """Download one image of ``msg``.

        Raises:
            ImageFetchError: the image cannot be had (answer with an apology).
        """
        ...

    async def open_reply(
        self, msg: InboundMessage, existing_reply_id: str | None = None
    ) -> ReplyStream:
        """Post the (idempotent) reply that will carry the streamed answer, or resume one.

        With ``existing_reply_id`` (the ``reply_message_id`` of a reply posted for ``msg`` by an
        earlier run) nothing is posted: the stream is bound to that reply and its first update
        edits it. The relay keeps that id because a platform's idempotency key may be forgotten
        (Feishu: after an hour) before a crashed job is run again.

        Raises:
            ReplyError: the reply could not be posted.
        """
        ...

    async def send_text_reply(self, msg: InboundMessage, text: str) -> None:
        """Reply once with a short text (idempotent per message).

        Raises:
            ReplyError: the reply could not be posted.
        """
        ...

    def status(self) -> AdapterStatus:
        """Current health for the dashboard and ``/readyz``."""
        ...

"""Topic fan-out between nodes: the :class:`Bus` protocol and its in-process :class:`LocalBus`."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from bridge.store.checks import check_key

log = structlog.get_logger(__name__)

#: Called with (topic, payload) for each message; must not block (hand off to a queue instead).
BusCallback = Callable[[str, bytes], None]

#: Largest message accepted by ``publish`` (an event frame, never an image).
MAX_MESSAGE_BYTES = 1 << 20

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True, eq=False)
class Subscription:
    """A handle for one callback on one topic, given back to :meth:`Bus.unsubscribe`."""

    topic: str
    callback: BusCallback
    id: int = field(default_factory=lambda: next(_ids))


class Bus(Protocol):
    """Publish bytes on a topic; every subscriber on every node gets them (see each backend's
    delivery guarantee)."""

    async def start(self) -> None:
        """Connect and start delivering; idempotent."""
        ...

    async def close(self) -> None:
        """Stop delivering and release connections."""
        ...

    async def publish(self, topic: str, payload: bytes) -> None:
        """Send ``payload`` to the topic's subscribers.

        Raises:
            StoreUnavailable: the backend is down; the message was not sent.
        """
        ...

    async def subscribe(self, topic: str, callback: BusCallback) -> Subscription:
        """Call ``callback(topic, payload)`` for the topic's messages until unsubscribed."""
        ...

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop one subscription; unknown or repeated ones are ignored."""
        ...


def check_message(topic: str, payload: bytes) -> None:
    """Refuse an empty or oversized topic, a non-bytes or oversized payload."""
    check_key(topic, "topic")
    if not isinstance(payload, bytes):
        raise TypeError("payload must be bytes")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(f"payload larger than {MAX_MESSAGE_BYTES} bytes")


def deliver(subs: list[Subscription], topic: str, payload: bytes) -> None:
    """Call each subscriber; one failing callback is logged and does not stop the others."""
    for sub in list(subs):
        try:
            sub.callback(topic, payload)
        except Exception:
            log.exception("bus_callback_failed", topic=topic, subscription=sub.id)


class LocalBus:
    """The bus inside one process: delivery is immediate, in order, and never lost."""

    def __init__(self) -> None:
        self._subs: dict[str, list[Subscription]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subs.clear()

    async def publish(self, topic: str, payload: bytes) -> None:
        check_message(topic, payload)
        deliver(self._subs.get(topic, []), topic, payload)

    async def subscribe(self, topic: str, callback: BusCallback) -> Subscription:
        check_key(topic, "topic")
        sub = Subscription(topic, callback)
        self._subs.setdefault(topic, []).append(sub)
        return sub

    async def unsubscribe(self, subscription: Subscription) -> None:
        subs = self._subs.get(subscription.topic, [])
        if subscription in subs:
            subs.remove(subscription)
        if not subs:
            self._subs.pop(subscription.topic, None)

"""The bus across nodes on Redis pub/sub.

Delivery guarantee: at most once, in publish order per publisher and topic, to every node that is
subscribed and connected when Redis routes the message. A message published while a node is cut off
from Redis is not delivered to it later. The hub uses it for session handoffs (claims, answers,
cancels, events forwarded to a session's new holder): a lost claim costs a timeout, a lost
forwarded event is the documented at-most-once limit of a move during a Redis outage
(docs/deploy.md). IM job events cross nodes on the ordered, resumable event log instead
(:mod:`bridge.cluster.redis_eventlog`).

One dedicated connection reads messages; when it breaks, a reconnect loop with backoff opens a new
one and subscribes again to every topic that still has a local subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub

from bridge.cluster.bus import BusCallback, Subscription, check_message, deliver
from bridge.cluster.eventlog import stop_task
from bridge.store.backoff import Backoff
from bridge.store.base import StoreUnavailable
from bridge.store.checks import check_key
from bridge.store.redis_client import is_unavailable, make_client, split_redis_url

log = structlog.get_logger(__name__)

_CONTROL = "__control__"


class RedisBus:
    """A :class:`~bridge.cluster.bus.Bus` on Redis pub/sub, channels ``{prefix}bus:{topic}``.

    Args:
        url: ``redis://host:port/db[?prefix=bridge:]``. Pub/sub ignores the DB number: use distinct
            prefixes to keep deployments sharing one Redis apart.
        subscribe_timeout_s: how long :meth:`subscribe` waits for Redis to confirm, when connected.
        backoff: reconnect delays (injected by tests).
    """

    def __init__(
        self,
        url: str,
        subscribe_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._client_url, prefix = split_redis_url(url)
        self._channel_prefix = f"{prefix}bus:"
        self._subscribe_timeout_s = subscribe_timeout_s
        self._backoff = backoff or Backoff(initial=0.05, cap=2.0)
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._subs: dict[str, list[Subscription]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.last_error: str | None = None

    def _channel(self, topic: str) -> str:
        return self._channel_prefix + topic

    async def start(self) -> None:
        if self._reader is not None:
            return
        self._client = make_client(self._client_url)
        self._reader = asyncio.create_task(self._read_forever(), name="redis-bus-reader")

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await stop_task(reader, 3.0)  # bounded: redis-py may swallow the cancellation
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        self.connected.clear()

    async def publish(self, topic: str, payload: bytes) -> None:
        check_message(topic, payload)
        if self._client is None:
            raise StoreUnavailable("bus is not started")
        try:
            await self._client.publish(self._channel(topic), payload)
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"redis publish failed: {exc}") from exc
            raise

    async def subscribe(self, topic: str, callback: BusCallback) -> Subscription:
        check_key(topic, "topic")
        sub = Subscription(topic, callback)
        subs = self._subs.setdefault(topic, [])
        subs.append(sub)
        if len(subs) == 1:
            await self._send_subscribe(topic)
        return sub

    async def unsubscribe(self, subscription: Subscription) -> None:
        subs = self._subs.get(subscription.topic)
        if not subs or subscription not in subs:
            return
        subs.remove(subscription)
        if subs:
            return
        del self._subs[subscription.topic]
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                await pubsub.unsubscribe(self._channel(subscription.topic))
            except Exception as exc:  # the reconnect path will not resubscribe it
                if not is_unavailable(exc):
                    raise

    async def _send_subscribe(self, topic: str) -> None:
        """Subscribe on the live connection and wait for Redis to confirm; if Redis is down, the
        reconnect loop subscribes later."""
        pubsub = self._pubsub
        if pubsub is None:
            return
        channel = self._channel(topic)
        confirmed = self._confirmed.setdefault(channel, asyncio.Event())
        try:
            await pubsub.subscribe(channel)
            await asyncio.wait_for(confirmed.wait(), self._subscribe_timeout_s)
        except TimeoutError:
            log.warning("bus_subscribe_unconfirmed", topic=topic)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("bus_subscribe_deferred", topic=topic, error=str(exc))

    async def _read_forever(self) -> None:
        while True:
            pubsub: PubSub | None = None
            try:
                assert self._client is not None
                pubsub = self._client.pubsub()
                self._pubsub = pubsub
                self._confirmed.clear()
                channels = [self._channel(_CONTROL)] + [self._channel(t) for t in self._subs]
                await pubsub.subscribe(*channels)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._handle(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_unavailable(exc):
                    log.exception("bus_reader_failed")
                self._lost(str(exc))
            finally:
                self._pubsub = None
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self._backoff.next_delay())

    def _lost(self, error: str) -> None:
        if self.connected.is_set() or self.last_error is None:
            log.warning("bus_disconnected", error=error)
        self.connected.clear()
        self.last_error = error

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        if not isinstance(channel, str) or not channel.startswith(self._channel_prefix):
            return
        topic = channel[len(self._channel_prefix) :]
        if kind == b"subscribe" or kind == "subscribe":
            self._confirmed.setdefault(channel, asyncio.Event()).set()
            if topic == _CONTROL:
                if self.last_error is not None:
                    log.info("bus_reconnected", topics=len(self._subs))
                self._backoff.reset()
                self.last_error = None
                self.connected.set()
            return
        if kind not in (b"message", "message"):
            return
        data = message.get("data")
        if isinstance(data, bytes):
            deliver(self._subs.get(topic, []), topic, data)

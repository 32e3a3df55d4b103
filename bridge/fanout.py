"""Cross-node fan-out of IM job events: every node's hub sees the events of every node's jobs.

A WebSocket session following ``chat:feishu:<id>`` may sit on node A while node B runs that chat's
job; the relay publishes each event once on the cluster bus and every node hands it to its own hub,
which delivers it to the sessions subscribed there (and ignores it when there are none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Protocol

import structlog

from bridge.cluster import Bus, Subscription
from engine.types import Delta, Done, Failed, JobEvent, Queued, Started, Usage

log = structlog.get_logger(__name__)

CHANNEL = "im-events"


class LocalHub(Protocol):
    """The part of the hub the fan-out feeds."""

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None: ...


def encode_event(topic: str, job_id: str, event: JobEvent) -> bytes:
    """One bus message: the topic, the job id and the event's fields."""
    data: dict[str, Any] = {"topic": topic, "id": job_id, "kind": event.kind}
    if isinstance(event, Queued):
        data["position"] = event.position
    elif isinstance(event, Delta):
        data["text"] = event.text
    elif isinstance(event, Done):
        data.update(
            text=event.text,
            cached=event.cached,
            usage=[event.usage.prompt_tokens, event.usage.completion_tokens],
        )
    elif isinstance(event, Failed):
        data.update(code=event.code, message=event.message, retry_after=event.retry_after)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def decode_event(payload: bytes) -> tuple[str, str, JobEvent]:
    """The inverse of :func:`encode_event`.

    Raises:
        ValueError: the payload is not an encoded event.
    """
    try:
        data = json.loads(payload)
        kind = data["kind"]
        event: JobEvent
        if kind == "queued":
            event = Queued(int(data["position"]))
        elif kind == "started":
            event = Started()
        elif kind == "delta":
            event = Delta(str(data["text"]))
        elif kind == "done":
            prompt, completion = data["usage"]
            event = Done(
                str(data["text"]), Usage(int(prompt), int(completion)), bool(data["cached"])
            )
        elif kind == "error":
            event = Failed(str(data["code"]), str(data["message"]), data.get("retry_after"))
        else:
            raise ValueError(f"unknown event kind {kind!r}")
        return str(data["topic"]), str(data["id"]), event
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an encoded job event: {exc}") from None


class ClusterFanout:
    """Publishes IM job events on the bus; forwards the bus's events to the local hub in order."""

    def __init__(self, bus: Bus, hub: LocalHub, max_pending: int = 100_000) -> None:
        self._bus = bus
        self._hub = hub
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(max_pending)
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the channel and start the forwarding task."""
        await self._bus.start()
        self._sub = await self._bus.subscribe(CHANNEL, self._received)
        self._task = asyncio.create_task(self._forward(), name="cluster-fanout")

    def _received(self, _topic: str, payload: bytes) -> None:
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            log.error("fanout_overflow", dropped=1)

    async def _forward(self) -> None:
        while True:
            payload = await self._queue.get()
            try:
                topic, job_id, event = decode_event(payload)
                await self._hub.publish(topic, job_id, event)
            except Exception as exc:  # one bad message must not stop the fan-out
                log.error("fanout_forward_failed", error=repr(exc))

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None:
        """Send one event to every node (this one included)."""
        await self._bus.publish(CHANNEL, encode_event(topic, job_id, event))

    async def stop(self) -> None:
        """Unsubscribe, stop forwarding and close the bus."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._bus.unsubscribe(self._sub)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._bus.close()

"""Cross-node fan-out of IM job events: every node's hub sees the events of every node's jobs.

A WebSocket session following ``chat:feishu:<id>`` may sit on node A while node B runs that chat's
job. The relay on B hands each event to :meth:`ClusterFanout.publish`, which gives it to B's own hub
at once (no Redis round trip, so B's sessions never depend on Redis) and queues it in an ordered
outbox that appends it to the cluster's event log (a Redis stream). Every node reads the log from
where it is and hands the events of other nodes to its hub, in log order, which keeps each job's
events in order. What a node's reader misses while cut off it reads on reconnecting; what cannot be
appended while Redis is down waits in the outbox. So an event is lost only when the stream has
trimmed it before a node read it (``fanout_gap``) or the outbox overflowed
(``fanout_outbox_overflow``), both logged.

Each payload carries its origin: the node id, a random token for this process (``run``) and a
sequence number. A node skips its own events when they come back, drops repeats (an append retried
after a partial failure, a stream read again after a reset) and logs jumps in the sequence
(``fanout_origin_gap``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from bridge.cluster.eventlog import EventLog
from bridge.cluster.eventlog_outbox import DEFAULT_MAX_ITEMS, Outbox
from bridge.jobs.events import event_fields, event_from_fields
from bridge.store.backoff import Backoff
from bridge.store.checks import check_key
from engine.types import JobEvent, Started

log = structlog.get_logger(__name__)

#: Origins (node and run) whose last sequence number is remembered for dropping repeats.
MAX_ORIGINS = 4096


class LocalHub(Protocol):
    """The part of the hub the fan-out feeds."""

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None: ...


class SessionEntries(Protocol):
    """Where the fan-out hands the entries addressed to sessions (the hub's session moves)."""

    def logged_event(self, entry_id: str, session_id: str, tail: str) -> None:
        """An event of a job whose session moved (any node's, this node's too)."""
        ...

    def logged_cancel(self, session_id: str, job_id: str, owner: str, node: str) -> None:
        """Another node's client cancelled a job of its session that may run here."""
        ...


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """A decoded session entry: an event ``tail`` for a session, or a cancel of ``job``."""

    session: str
    origin: Origin
    tail: str | None = None
    job: str | None = None
    owner: str | None = None


def encode_session_entry(origin: Origin, session: str, **fields: str) -> bytes:
    """A session entry: ``sid`` first (never mistaken for one of this node's own topic events),
    then ``tail`` (an event) or ``cancel`` and ``owner`` (a cancel), then the origin."""
    data: dict[str, Any] = {"sid": session, **fields}
    data.update(origin=origin.node, run=origin.run, sseq=origin.seq)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def decode_session_entry(data: dict[str, Any]) -> SessionEntry:
    """The inverse of :func:`encode_session_entry` on the decoded JSON object.

    Raises:
        ValueError: not a session entry.
    """
    seq = data.get("sseq")
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise ValueError("sseq must be an integer")
    values = [data.get(k) for k in ("sid", "origin", "run")]
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError("sid, origin and run must be strings")
    session, node, run = (str(v) for v in values)
    origin = Origin(node, run, seq)
    if "tail" in data:
        tail = data["tail"]
        if not isinstance(tail, str) or not tail.endswith("}"):
            raise ValueError("bad tail")
        return SessionEntry(session, origin, tail=tail)
    job, owner = data.get("cancel"), data.get("owner")
    if not isinstance(job, str) or not isinstance(owner, str):
        raise ValueError("a session entry needs a tail or a cancel with its owner")
    return SessionEntry(session, origin, job=job, owner=owner)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a payload comes from: the node, the process's run token and its sequence number."""

    node: str
    run: str
    seq: int


@dataclass(frozen=True, slots=True)
class FanoutMessage:
    """One decoded payload: the event, its topic and job, and its origin when it has one."""

    topic: str
    job_id: str
    event: JobEvent
    origin: Origin | None


def encode_event(topic: str, job_id: str, event: JobEvent, origin: Origin | None = None) -> bytes:
    """One log entry: the origin (optionally), the topic, the job id and the event's fields."""
    data: dict[str, Any] = {}
    if origin is not None:
        data.update(origin=origin.node, run=origin.run, seq=origin.seq)
    data.update(topic=topic, id=job_id)
    data.update(event_fields(event))
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _origin_prefix(node: str, run: str) -> bytes:
    """The bytes every payload of ``(node, run)`` starts with (the origin is encoded first)."""
    return encode_event("", "", Started(), Origin(node, run, 0)).partition(b',"seq":')[0]


def decode_message(payload: bytes) -> FanoutMessage:
    """The inverse of :func:`encode_event`; unknown fields are ignored.

    Raises:
        ValueError: the payload is not an encoded event.
    """
    try:
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        event = event_from_fields(data)
        origin = None
        if "origin" in data:
            seq = data["seq"]
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise ValueError("seq must be an integer")
            origin = Origin(str(data["origin"]), str(data["run"]), seq)
        return FanoutMessage(str(data["topic"]), str(data["id"]), event, origin)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an encoded job event: {exc}") from None


def decode_event(payload: bytes) -> tuple[str, str, JobEvent]:
    """(topic, job id, event) of an encoded payload (see :func:`decode_message`).

    Raises:
        ValueError: the payload is not an encoded event.
    """
    msg = decode_message(payload)
    return msg.topic, msg.job_id, msg.event


class ClusterFanout:
    """Publishes IM job events to the local hub and the event log; forwards other nodes' events
    from the log to the local hub, in order and once each.

    Args:
        events: the cluster's event log (``RedisEventLog``), owned and closed by the fan-out.
        hub: this node's hub.
        node_id: this node's id (the same as the hub's), carried in every payload.
        max_pending: read events waiting for the hub before new ones are dropped.
        max_outbox: events waiting for the log (Redis down) before the oldest are dropped.
        flush_timeout_s: how long :meth:`stop` lets the outbox drain.
        backoff: delays between failed appends (injected by tests).
    """

    def __init__(
        self,
        events: EventLog,
        hub: LocalHub,
        node_id: str,
        *,
        max_pending: int = 100_000,
        max_outbox: int = DEFAULT_MAX_ITEMS,
        flush_timeout_s: float = 2.0,
        backoff: Backoff | None = None,
        sessions: SessionEntries | None = None,
    ) -> None:
        self.node_id = check_key(node_id, "node_id")
        self._sessions = sessions
        #: The id of the last entry read (whatever it was): where this node's reading stands.
        self.cursor: str | None = None
        self._sseq = 0
        self._last_sseq: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._logger = log.bind(node=self.node_id)
        self._events = events
        self._hub = hub
        self._run = secrets.token_hex(6)
        # This node's own entries come back from the log: skip them on sight, without decoding
        # (_is_new checks the decoded origin too, for payloads encoded another way).
        self._own_prefix = _origin_prefix(node_id, self._run)
        self._seq = 0
        self._outbox = Outbox(events, node_id, max_items=max_outbox, backoff=backoff)
        self._flush_timeout_s = flush_timeout_s
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(max_pending)
        self._last_seq: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.forwarded = 0
        self.repeats = 0

    def status(self) -> dict[str, Any]:
        """A small summary for operators: outbox depth and drops, reader state, last gap."""
        return {
            "node": self.node_id,
            "outbox_depth": self._outbox.depth,
            "outbox_dropped": self._outbox.dropped,
            "appended": self._outbox.appended,
            "forwarded": self.forwarded,
            "repeats": self.repeats,
            "connected": _connected(self._events),
            "last_gap": getattr(self._events, "last_gap", None),
        }

    @property
    def outbox_depth(self) -> int:
        """Events waiting to be appended to the log."""
        return self._outbox.depth

    async def start(self) -> None:
        """Start reading the log (from its current end), forwarding, and the outbox."""
        await self._events.start(self._received)
        self._task = asyncio.create_task(self._forward(), name="cluster-fanout")
        self._outbox.start()

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None:
        """Hand one event to this node's hub and queue it for every other node; never raises."""
        try:
            self._seq += 1
            payload = encode_event(topic, job_id, event, Origin(self.node_id, self._run, self._seq))
            self._outbox.put(payload)
        except Exception as exc:  # an unencodable event still reaches this node's sessions
            self._logger.error("fanout_publish_failed", job=job_id, error=repr(exc))
        try:
            await self._hub.publish(topic, job_id, event)
        except Exception as exc:
            self._logger.error("fanout_local_failed", job=job_id, error=repr(exc))

    def publish_session(self, session_id: str, tail: str) -> bool:
        """Queue an event of a job whose session moved away, for whichever node holds it
        (this one too, if it comes back); False when it could not be queued (logged)."""
        return self._put_session(session_id, tail=tail)

    def publish_cancel(self, session_id: str, job_id: str, owner: str) -> bool:
        """Queue a cancel of job ``job_id`` of a session for the node running it; False when it
        could not be queued."""
        return self._put_session(session_id, cancel=job_id, owner=owner)

    def _put_session(self, session_id: str, **fields: str) -> bool:
        try:
            self._sseq += 1
            origin = Origin(self.node_id, self._run, self._sseq)
            self._outbox.put(encode_session_entry(origin, session_id, **fields))
            return True
        except Exception as exc:
            self._logger.error("fanout_session_entry_failed", session=session_id, error=repr(exc))
            return False

    def _received(self, entry_id: str, payload: bytes) -> None:
        self.cursor = entry_id
        if payload.startswith(b'{"sid":'):
            self._session_entry(entry_id, payload)
            return
        if payload.startswith(self._own_prefix):
            return
        try:
            self._queue.put_nowait((entry_id, payload))
        except asyncio.QueueFull:
            self._logger.error("fanout_overflow", entry_id=entry_id, dropped=1)

    async def _forward(self) -> None:
        while True:
            entry_id, payload = await self._queue.get()
            try:
                msg = decode_message(payload)
            except ValueError as exc:
                self._logger.error("fanout_payload_malformed", entry_id=entry_id, error=str(exc))
                continue
            if not self._is_new(entry_id, msg.origin):
                continue
            try:
                await self._hub.publish(msg.topic, msg.job_id, msg.event)
                self.forwarded += 1
            except Exception as exc:  # one bad event must not stop the fan-out
                self._logger.error(
                    "fanout_forward_failed", entry_id=entry_id, job=msg.job_id, error=repr(exc)
                )

    def _session_entry(self, entry_id: str, payload: bytes) -> None:
        """Hand a session entry over now, in log order (the hub's moves compare positions)."""
        try:
            data = json.loads(payload)
            entry = decode_session_entry(data if isinstance(data, dict) else {})
        except ValueError as exc:
            self._logger.error("fanout_payload_malformed", entry_id=entry_id, error=str(exc))
            return
        origin = entry.origin
        key = (origin.node, origin.run)
        last = self._last_sseq.get(key)
        if (last is not None and origin.seq <= last) or self._sessions is None:
            return  # a repeat (an append retried after a partial failure)
        self._last_sseq[key] = origin.seq
        self._last_sseq.move_to_end(key)
        if len(self._last_sseq) > MAX_ORIGINS:
            self._last_sseq.popitem(last=False)
        try:
            if entry.tail is not None:
                self._sessions.logged_event(entry_id, entry.session, entry.tail)
            elif origin.node != self.node_id and entry.job is not None and entry.owner:
                self._sessions.logged_cancel(entry.session, entry.job, entry.owner, origin.node)
        except Exception as exc:  # one bad entry must not stop the reader
            self._logger.error("fanout_session_entry_failed", entry_id=entry_id, error=repr(exc))

    def _is_new(self, entry_id: str, origin: Origin | None) -> bool:
        """False for this process's own events and for repeats; logs a jump in an origin's seq."""
        if origin is None:
            return True
        if origin.node == self.node_id and origin.run == self._run:
            return False
        key = (origin.node, origin.run)
        last = self._last_seq.get(key)
        if last is not None and origin.seq <= last:
            self.repeats += 1
            return False
        if last is not None and origin.seq > last + 1:
            self._logger.error(
                "fanout_origin_gap",
                entry_id=entry_id,
                origin=origin.node,
                run=origin.run,
                expected_seq=last + 1,
                seq=origin.seq,
            )
        self._last_seq[key] = origin.seq
        self._last_seq.move_to_end(key)
        if len(self._last_seq) > MAX_ORIGINS:
            self._last_seq.popitem(last=False)
        return True

    async def stop(self) -> None:
        """Let the outbox drain for a short time, then stop reading, forwarding and appending."""
        await self._outbox.stop(self._flush_timeout_s)
        with contextlib.suppress(Exception):
            await self._events.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _connected(event_log: EventLog) -> bool | None:
    """Whether the log's reader is connected, for logs that say (None otherwise)."""
    flag = getattr(event_log, "connected", None)
    return flag.is_set() if isinstance(flag, asyncio.Event) else None

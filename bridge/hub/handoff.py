"""Moving a live session between nodes over the cluster bus: claims, releases, event forwarding.

A node that is asked to resume a session it does not hold broadcasts a *claim* on
:data:`CLAIMS_CHANNEL`; the node holding the session closes its connection (4005), writes it to the
store and answers *released* on the claimer's own channel. Events of jobs still running on the old
node follow the session as *event* messages on the new holder's channel. The bus delivers at most
once and in order per publisher, so every message of one node goes through one ordered outbox, and
events that arrive while a claim is still loading the session are held for it. A client's
``cancel`` for a job that runs on another node than the one holding its session travels as a
*cancel* request on :data:`CLAIMS_CHANNEL` (the holder does not know which node runs the job).

This module moves messages only; what a claim means for a session is the hub's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from bridge.cluster.bus import MAX_MESSAGE_BYTES, Bus, Subscription
from bridge.store.base import MAX_OPEN_JOBS

log = structlog.get_logger(__name__)

CLAIMS_CHANNEL = "hub:claims"
NODE_CHANNEL = "hub:node:"
#: Events held for one session while its claim is loading it (beyond: dropped and logged).
MAX_HELD_EVENTS = 10_000
#: Messages waiting to be published; beyond, the oldest forwarded events are lost (logged).
MAX_OUTBOX = 100_000
MAX_ID_CHARS = 200


def node_channel(node_id: str) -> str:
    """The bus channel only ``node_id`` listens on (answers and forwarded events)."""
    return NODE_CHANNEL + node_id


@dataclass(frozen=True, slots=True)
class Claim:
    """Node ``node`` wants session ``session`` for the token labelled ``owner``.

    ``expect`` is the holder the store names (None when it names none).
    """

    session: str
    node: str
    req: str
    owner: str
    expect: str | None


@dataclass(frozen=True, slots=True)
class Answer:
    """A claim's answer: ``released`` (with the holder's last seq) or ``absent`` (not held).

    ``orphans`` (released only): open jobs of the session that are not running on the old holder
    either (it loaded them from the store after a crash and never ended them), so the claimer
    ends them (:mod:`bridge.hub.orphans`). Every other open job still runs there.
    """

    kind: str
    session: str
    node: str
    req: str
    last_seq: int = 0
    orphans: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Node ``node`` asks whichever node runs job ``job`` of session ``session`` to cancel it.

    ``owner`` is the label of the session's token: only the owner's client may stop its jobs.
    """

    session: str
    job: str
    owner: str
    node: str


@dataclass(slots=True)
class _Pending:
    req: str
    expect: str | None
    answer: asyncio.Future[Answer]
    held: list[str] = field(default_factory=list)
    dropped: int = 0


def _id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ValueError("bad id")
    return value


def decode(payload: bytes) -> Claim | Answer | CancelRequest | tuple[str, str]:
    """One bus message: a :class:`Claim`, an :class:`Answer`, a :class:`CancelRequest`, or
    ``(session, tail)`` of an event.

    Raises:
        ValueError: the payload is not a handoff message.
    """
    try:
        obj = json.loads(payload)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        kind = obj.get("t")
        session = _id(obj.get("sid"))
        if kind == "event":
            tail = obj.get("tail")
            if not isinstance(tail, str) or not tail.endswith("}"):
                raise ValueError("bad tail")
            return session, tail
        if kind == "cancel":
            job, owner = _id(obj.get("job")), _id(obj.get("owner"))
            return CancelRequest(session, job, owner, _id(obj.get("node")))
        node, req = _id(obj.get("node")), _id(obj.get("req"))
        if kind == "claim":
            expect = obj.get("expect")
            owner = _id(obj.get("owner"))
            return Claim(session, node, req, owner, None if expect is None else _id(expect))
        if kind in ("released", "absent"):
            seq = obj.get("last_seq", 0)
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                raise ValueError("bad last_seq")
            orphans = obj.get("orphans", [])  # absent from nodes that predate it
            if not isinstance(orphans, list) or len(orphans) > MAX_OPEN_JOBS:
                raise ValueError("bad orphans")
            return Answer(kind, session, node, req, seq, tuple(_id(j) for j in orphans))
        raise ValueError(f"unknown kind {kind!r}")
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a handoff message: {exc}") from None


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Handoff:
    """This node's end of the handoff protocol on ``bus``.

    Args:
        bus: the cluster bus (shared with other users is fine; it is never closed here).
        node_id: this node's id, unique in the cluster.
        timeout_s: how long a claim waits for the holder's answer before loading from the store.
        on_claim: called (synchronously) with every other node's claim.
        on_event: called (synchronously) with a forwarded event no claim is waiting for.
        on_cancel: called (synchronously) with every other node's cancel request.
    """

    def __init__(
        self,
        bus: Bus,
        node_id: str,
        timeout_s: float,
        *,
        on_claim: Callable[[Claim], None],
        on_event: Callable[[str, str], None],
        on_cancel: Callable[[CancelRequest], None],
    ) -> None:
        _id(node_id)
        self.bus = bus
        self.node_id = node_id
        self.timeout_s = timeout_s
        self._on_claim = on_claim
        self._on_event = on_event
        self._on_cancel = on_cancel
        self._pending: dict[str, _Pending] = {}
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(MAX_OUTBOX)
        self._subs: list[Subscription] = []
        self._sender: asyncio.Task[None] | None = None
        self.forwarded = 0
        self.lost = 0

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the claims channel and this node's channel; start the sender."""
        await self.bus.start()
        self._subs.append(await self.bus.subscribe(CLAIMS_CHANNEL, self._received))
        self._subs.append(await self.bus.subscribe(node_channel(self.node_id), self._received))
        self._sender = asyncio.get_running_loop().create_task(self._send_loop(), name="hub-handoff")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Publish what is queued (up to ``timeout_s``), then unsubscribe and stop sending."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._outbox.join()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await self.bus.unsubscribe(sub)
        self._subs.clear()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        for pending in self._pending.values():
            if not pending.answer.done():
                pending.answer.cancel()

    # --- claiming --------------------------------------------------------------------------
    async def claim(
        self, session: str, owner: str, expect: str | None, *, wait: bool
    ) -> Answer | None:
        """Ask the holder of ``session`` to release it; its answer, or None when none came.

        The claim is broadcast; it waits (at most ``timeout_s``: a dead holder never answers)
        only when ``wait`` is set and the expected holder is not this node. Until
        :meth:`take_held` ends the claim, events of the session are held in order.
        """
        current = self._pending.get(session)
        if current is not None:  # a second hello for the same session: share the first claim
            future = current.answer
        else:
            req = secrets.token_hex(8)
            future = asyncio.get_running_loop().create_future()
            self._pending[session] = _Pending(req, expect, future)
            msg = {
                "t": "claim",
                "sid": session,
                "node": self.node_id,
                "req": req,
                "owner": owner,
                "expect": expect,
            }
            self._queue(CLAIMS_CHANNEL, _encode(msg))
        if not wait or expect == self.node_id:
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            log.info("hub_handoff_timeout", session=session, holder=expect)
            return None
        except asyncio.CancelledError:
            if future.cancelled():  # stop() ended the claim, not our caller
                return None
            raise

    def hold(self, session: str, tail: str) -> bool:
        """Keep an event of ``session`` for its claim in progress; False when none is.

        A job still running on this node while the session comes back to it must not go round
        the other node: those events would overtake the ones already forwarded there.
        """
        pending = self._pending.get(session)
        if pending is None:
            return False
        if len(pending.held) < MAX_HELD_EVENTS:
            pending.held.append(tail)
        else:
            pending.dropped += 1
        return True

    def take_held(self, session: str) -> list[str]:
        """End the claim on ``session``: the event tails held for it, in arrival order."""
        pending = self._pending.pop(session, None)
        if pending is None:
            return []
        if pending.dropped:
            log.error("hub_handoff_events_dropped", session=session, dropped=pending.dropped)
        return pending.held

    # --- answering and forwarding ----------------------------------------------------------
    def answer(
        self, claim: Claim, kind: str, last_seq: int = 0, orphans: Sequence[str] = ()
    ) -> None:
        """Answer ``claim`` on the claimer's channel (after any event forwarded before it)."""
        msg: dict[str, Any] = {
            "t": kind,
            "sid": claim.session,
            "node": self.node_id,
            "req": claim.req,
            "last_seq": last_seq,
        }
        if orphans:
            msg["orphans"] = list(orphans)
        self._queue(node_channel(claim.node), _encode(msg))

    def cancel(self, session: str, job: str, owner: str) -> bool:
        """Ask every other node to cancel job ``job`` of ``session`` if it runs there.

        Broadcast, because only the node running a job knows it (the session's holder knows the
        job is open, not where). False when the request could not even be queued.
        """
        msg = {"t": "cancel", "sid": session, "job": job, "owner": owner, "node": self.node_id}
        return self._queue(CLAIMS_CHANNEL, _encode(msg))

    def forward(self, node: str, session: str, tail: str) -> None:
        """Send an event of ``session`` to ``node``, which now holds it and numbers it."""
        payload = _encode({"t": "event", "sid": session, "tail": tail})
        if len(payload) > MAX_MESSAGE_BYTES:
            self.lost += 1
            log.error("hub_handoff_event_too_large", session=session, bytes=len(payload))
            return
        self.forwarded += 1
        self._queue(node_channel(node), payload)

    def _queue(self, channel: str, payload: bytes) -> bool:
        try:
            self._outbox.put_nowait((channel, payload))
        except asyncio.QueueFull:
            self.lost += 1
            log.error("hub_handoff_outbox_full", channel=channel)
            return False
        return True

    async def _send_loop(self) -> None:
        """Publish the outbox in order; a failed publish is logged and the next one goes on."""
        while True:
            channel, payload = await self._outbox.get()
            try:
                await self.bus.publish(channel, payload)
            except Exception as exc:  # StoreUnavailable: the message is lost (at most once)
                self.lost += 1
                log.warning("hub_handoff_publish_failed", channel=channel, error=repr(exc))
            finally:
                self._outbox.task_done()

    # --- receiving -------------------------------------------------------------------------
    def _received(self, _channel: str, payload: bytes) -> None:
        try:
            msg = decode(payload)
        except ValueError as exc:
            log.warning("hub_handoff_bad_message", error=str(exc))
            return
        if isinstance(msg, Claim):
            if msg.node != self.node_id:
                self._on_claim(msg)
            return
        if isinstance(msg, CancelRequest):
            if msg.node != self.node_id:
                self._on_cancel(msg)
            return
        if isinstance(msg, Answer):
            pending = self._pending.get(msg.session)
            if pending is None or pending.req != msg.req or pending.answer.done():
                return
            if msg.kind == "absent" and msg.node != pending.expect:
                return
            pending.answer.set_result(msg)
            return
        session, tail = msg
        pending = self._pending.get(session)
        if pending is None:
            self._on_event(session, tail)
        elif len(pending.held) < MAX_HELD_EVENTS:
            pending.held.append(tail)
        else:
            pending.dropped += 1

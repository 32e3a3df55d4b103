"""Moving a live session between nodes over the cluster bus: claims and their answers.

A node that is asked to resume a session it does not hold broadcasts a *claim* on
:data:`CLAIMS_CHANNEL`; the node holding the session closes its connection (4005), writes it to the
store and answers *released* on the claimer's own channel, with its last seq and its position in
the cluster's event log. The events of jobs still running on the old node, and cancels of them, do
not use the bus (at most once): they go through the event log (:mod:`bridge.hub.moves`). A lost
claim or answer costs only the wait: the claimer then loads the session from the store.

This module moves messages only; what a claim means for a session is the hub's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from bridge.cluster.bus import Bus, Subscription
from bridge.cluster.eventlog import parse_entry_id
from bridge.store.base import MAX_OPEN_JOBS

log = structlog.get_logger(__name__)

CLAIMS_CHANNEL = "hub:claims"
NODE_CHANNEL = "hub:node:"
#: Messages waiting to be published; beyond, new ones are refused (logged).
MAX_OUTBOX = 10_000
MAX_ID_CHARS = 200


def node_channel(node_id: str) -> str:
    """The bus channel only ``node_id`` listens on (answers to its claims)."""
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
    ends them (:mod:`bridge.hub.orphans`). Every other open job still runs there. ``cursor``
    (released only): the last event-log entry the holder had read when it let go; it applied
    every logged event of the session up to there, the claimer applies the later ones.
    """

    kind: str
    session: str
    node: str
    req: str
    last_seq: int = 0
    orphans: tuple[str, ...] = ()
    cursor: str | None = None


@dataclass(slots=True)
class _Pending:
    req: str
    expect: str | None
    answer: asyncio.Future[Answer]


def _id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ValueError("bad id")
    return value


def decode(payload: bytes) -> Claim | Answer:
    """One bus message: a :class:`Claim` or an :class:`Answer`.

    Raises:
        ValueError: the payload is not a handoff message (events and cancels of older nodes
            included: they now travel on the event log).
    """
    try:
        obj = json.loads(payload)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        kind = obj.get("t")
        session = _id(obj.get("sid"))
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
            cursor = obj.get("cursor")
            if cursor is not None:
                parse_entry_id(_id(cursor))
            jobs = tuple(_id(j) for j in orphans)
            return Answer(kind, session, node, req, seq, jobs, cursor)
        raise ValueError(f"unknown kind {kind!r}")
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a handoff message: {exc}") from None


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def answer_message(
    node_id: str,
    claim: Claim,
    kind: str,
    last_seq: int = 0,
    orphans: Sequence[str] = (),
    cursor: str | None = None,
) -> bytes:
    """The answer of node ``node_id`` to ``claim`` (see :class:`Answer`), as sent on the bus."""
    msg: dict[str, Any] = {
        "t": kind,
        "sid": claim.session,
        "node": node_id,
        "req": claim.req,
        "last_seq": last_seq,
    }
    if orphans:
        msg["orphans"] = list(orphans)
    if cursor is not None:
        msg["cursor"] = cursor
    return _encode(msg)


class Handoff:
    """This node's end of the handoff protocol on ``bus``.

    Args:
        bus: the cluster bus (shared with other users is fine; it is never closed here).
        node_id: this node's id, unique in the cluster.
        timeout_s: how long a claim waits for the holder's answer before loading from the store.
        on_claim: called (synchronously) with every other node's claim.
    """

    def __init__(
        self,
        bus: Bus,
        node_id: str,
        timeout_s: float,
        *,
        on_claim: Callable[[Claim], None],
    ) -> None:
        _id(node_id)
        self.bus = bus
        self.node_id = node_id
        self.timeout_s = timeout_s
        self._on_claim = on_claim
        self._pending: dict[str, _Pending] = {}
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(MAX_OUTBOX)
        self._subs: list[Subscription] = []
        self._sender: asyncio.Task[None] | None = None
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
        :meth:`end_claim` ends the claim, a second hello for the session shares it.
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

    def end_claim(self, session: str) -> None:
        """Forget the claim on ``session`` (its answer came, or the wait is over)."""
        self._pending.pop(session, None)

    # --- answering ---------------------------------------------------------------------------
    def answer(
        self,
        claim: Claim,
        kind: str,
        last_seq: int = 0,
        orphans: Sequence[str] = (),
        cursor: str | None = None,
    ) -> None:
        """Answer ``claim`` on the claimer's channel."""
        self.send_answer(
            claim, answer_message(self.node_id, claim, kind, last_seq, orphans, cursor)
        )

    def send_answer(self, claim: Claim, payload: bytes) -> None:
        """Send an answer made by :func:`answer_message` on the claimer's channel."""
        self._queue(node_channel(claim.node), payload)

    def claim_req(self, session: str) -> str | None:
        """The request id of this node's claim on ``session`` in progress (None: no claim)."""
        pending = self._pending.get(session)
        return None if pending is None else pending.req

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
        pending = self._pending.get(msg.session)
        if pending is None or pending.req != msg.req or pending.answer.done():
            return
        if msg.kind == "absent" and msg.node != pending.expect:
            return
        pending.answer.set_result(msg)

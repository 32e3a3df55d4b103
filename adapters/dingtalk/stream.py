"""The asyncio stream client: ticket, WebSocket, acks, our silent deadline, reconnect/backoff.

It moves text between a ``websockets`` connection and :class:`StreamProtocol`; what to answer
and when the link is dead is decided in the core. A SYSTEM ``disconnect`` stops new callbacks on
that link and opens a new connection at once, while the old link stays open (briefly) for the
acks of the callbacks in hand; anything left unacked is delivered again by DingTalk and deduped
by the sink.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote_plus

import structlog
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from adapters.dingtalk.config import DingTalkConfig
from adapters.dingtalk.openapi import DingTalkApi, DingTalkApiError
from adapters.dingtalk.protocol import CallbackDelivery, DisconnectRequested, StreamProtocol
from adapters.reconnecting import ReconnectingClient
from adapters.retry import Backoff
from adapters.status import StatusTracker

log = structlog.get_logger(__name__)

CallbackHandler = Callable[[CallbackDelivery], Awaitable[bool]]
_conn_ids = itertools.count(1)


class ConnectionLost(Exception):
    """The current connection ended; the message says why (never a secret)."""


class _Moved(Exception):
    """The server asked for a new connection: reconnect without a backoff wait."""


def reconnect_backoff(config: DingTalkConfig, rng: random.Random) -> Backoff:
    """The stream's reconnect backoff: doubling from ``reconnect_base_s`` to ``reconnect_max_s``.

    Each wait is drawn from the upper half of that ceiling ("equal jitter"), so a fleet that lost
    its links at once does not come back at once, and a wait never collapses to nothing.
    """
    cap = max(config.reconnect_max_s, config.reconnect_base_s)
    return Backoff(config.reconnect_base_s, cap, 0.5, rng.random, spread="below")


def refusal(exc: DingTalkApiError) -> bool:
    """Whether DingTalk refused the app itself (wrong id/secret, no permission): 4xx not 429."""
    return 400 <= exc.http_status < 500 and exc.http_status != 429


class StreamClient(ReconnectingClient):
    """Keeps one stream connection to DingTalk up until :meth:`stop`."""

    loop_name = "dingtalk-stream"

    def __init__(
        self,
        config: DingTalkConfig,
        api: DingTalkApi,
        handler: CallbackHandler,
        status: StatusTracker,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._cfg = config
        self._api = api
        self._handler = handler
        self._status = status
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._sleep = sleep
        self.backoff = reconnect_backoff(config, self._rng)
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._connected_at: float | None = None
        self.connections = 0
        self.acked = 0

    async def _run(self) -> None:
        """Connect, and after every loss try again (with backoff) until :meth:`stop`."""
        failed_tries = 0
        backoff = self.backoff
        backoff.reset()
        while not self._stopping:
            if self.connections == 0 and failed_tries == 0:
                self._status.set_state("connecting")
            self._connected_at = None
            refused = False
            try:
                endpoint, ticket = await self._api.open_connection()
                await self._connect_once(endpoint, ticket)
            except asyncio.CancelledError:
                raise
            except _Moved:
                log.info("dingtalk.stream_moving", app=self._cfg.client_id)
                self._status.set_state("reconnecting", attempts=0)
                failed_tries = 0
                backoff.reset()
                # A short random pause, so a server that keeps moving us cannot spin this loop.
                await self._sleep(self._rng.uniform(0.0, self._cfg.reconnect_base_s))
                continue
            except DingTalkApiError as exc:
                refused, reason = refusal(exc), str(exc)[:200]
            except (ConnectionLost, OSError, WebSocketException, TimeoutError) as exc:
                reason = _describe(exc)
            except Exception as exc:  # the loop must survive anything to stay honest
                reason = f"unexpected: {type(exc).__name__}"
                log.exception("dingtalk.stream_error")
            self._status.record_error(reason)
            if self._stopping:
                return
            up_since = self._connected_at
            if up_since is not None:
                failed_tries = 0
                if self._monotonic() - up_since >= self._cfg.stable_after_s:
                    backoff.reset()
            else:
                failed_tries += 1
            delay = backoff.next_delay()
            if refused:  # no quick retry can mend a refusal: wait the longest backoff step
                delay = backoff.delay(30)
            self._status.set_state("failed" if refused else "reconnecting", attempts=failed_tries)
            log.warning(
                "dingtalk.stream_lost",
                app=self._cfg.client_id,
                reason=reason,
                came_up=up_since is not None,
                failed_tries=failed_tries,
                refused=refused,
                retry_in_s=round(delay, 3),
            )
            await self._sleep(delay)

    async def _connect_once(self, endpoint: str, ticket: str) -> None:
        """Run one connection until it fails (:class:`ConnectionLost`) or moves (``_Moved``)."""
        conn_id = next(_conn_ids)
        url = f"{endpoint}{'&' if '?' in endpoint else '?'}ticket={quote_plus(ticket)}"
        try:
            ws = await websockets.connect(
                url,
                open_timeout=self._cfg.api_timeout_s,
                ping_interval=None,  # our own deadline on DingTalk's frames decides liveness
                close_timeout=1.0,
                max_size=4 * 1024 * 1024,
            )
        except InvalidStatus as exc:
            raise ConnectionLost(f"handshake refused: http {exc.response.status_code}") from None
        now = self._monotonic()
        self._connected_at = now
        self.connections += 1
        proto = StreamProtocol(now=now, silent_timeout_s=self._cfg.silent_timeout_s)
        self._status.set_state("connected", attempts=0)
        log.info("dingtalk.stream_connected", conn_id=conn_id, app=self._cfg.client_id)
        lock = asyncio.Lock()
        mine: set[asyncio.Task[None]] = set()
        try:
            await self._pump(ws, proto, lock, conn_id, mine)
        except _Moved:
            # The old link stays open for the acks of the callbacks in hand while the new one
            # is opened at once.
            closer = asyncio.create_task(self._drain(ws, mine), name="dingtalk-drain")
            self._handlers.add(closer)
            closer.add_done_callback(self._handlers.discard)
            raise
        except ConnectionClosed as exc:
            await ws.close()
            raise ConnectionLost(f"closed: code {exc.rcvd.code if exc.rcvd else 'none'}") from None
        except BaseException:
            await ws.close()
            raise

    async def _drain(self, ws: ClientConnection, mine: set[asyncio.Task[None]]) -> None:
        """Let the callbacks of a moved link finish their acks (up to ``drain_s``), then close."""
        try:
            if mine:
                await asyncio.wait(set(mine), timeout=self._cfg.drain_s)
        finally:
            await ws.close()

    async def _pump(
        self,
        ws: ClientConnection,
        proto: StreamProtocol,
        lock: asyncio.Lock,
        conn_id: int,
        mine: set[asyncio.Task[None]],
    ) -> None:
        while True:
            proto.tick(self._monotonic())
            await self._flush(ws, proto, lock)
            if proto.failure is not None:
                log.warning("dingtalk.stream_failed", conn_id=conn_id, reason=proto.failure)
                raise ConnectionLost(proto.failure)
            timeout = max(0.0, proto.next_wakeup() - self._monotonic())
            try:
                async with asyncio.timeout(timeout):
                    message = await ws.recv()
            except TimeoutError:
                continue
            proto.receive(message, self._monotonic())
            for event in proto.events_received():
                if isinstance(event, DisconnectRequested):
                    await self._flush(ws, proto, lock)
                    log.info("dingtalk.stream_disconnect", conn_id=conn_id, pending=len(mine))
                    raise _Moved()
                task = asyncio.create_task(self._dispatch(ws, proto, lock, event, conn_id))
                for group in (self._handlers, mine):
                    group.add(task)
                    task.add_done_callback(group.discard)

    async def _dispatch(
        self,
        ws: ClientConnection,
        proto: StreamProtocol,
        lock: asyncio.Lock,
        delivery: CallbackDelivery,
        conn_id: int,
    ) -> None:
        try:
            ok = await self._handler(delivery)
        except Exception:
            log.exception(
                "dingtalk.stream_handler_error", conn_id=conn_id, delivery=delivery.message_id
            )
            ok = False
        if not ok:
            return  # unacked: DingTalk delivers it again and the sink dedupes it
        proto.ack(delivery)
        try:
            await self._flush(ws, proto, lock)
        except (ConnectionClosed, OSError):
            log.info("dingtalk.stream_ack_lost", conn_id=conn_id, delivery=delivery.message_id)
            return
        self.acked += 1

    async def _flush(self, ws: ClientConnection, proto: StreamProtocol, lock: asyncio.Lock) -> None:
        async with lock:
            for data in proto.data_to_send():
                await ws.send(data)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ConnectionLost):
        return text[:200]
    return f"{type(exc).__name__}: {text[:160]}"

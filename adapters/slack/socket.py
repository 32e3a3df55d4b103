"""The Socket Mode connection: open a socket URL, dial it, read, ack, refresh and reconnect.

A link is one WebSocket from ``apps.connections.open``. It is healthy once Slack said ``hello``.
On ``disconnect`` with ``warning``/``refresh_requested`` the client opens the next link while the
old one is still read, and retires the old one only after its acks went out, so no envelope is
lost. ``link_disabled`` (Socket Mode switched off for the app) and refused tokens end in
``failed``. A link silent for ``ping_interval_s`` gets our ping; silent for
``receive_deadline_s`` it is dropped and the client reconnects with jittered backoff.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import structlog

from adapters.retry import Backoff
from adapters.slack.config import SlackConfig
from adapters.slack.protocol import ProtocolError, SocketMessage, ack_frame, parse_socket_message
from adapters.slack.webapi import JITTER, REFUSALS, SlackApiError, SlackWebApi
from adapters.status import StatusTracker

log = structlog.get_logger(__name__)

#: Decides one envelope; True means acknowledge it (after the sink recorded the message).
EnvelopeHandler = Callable[[SocketMessage], Awaitable[bool]]
REFRESH_REASONS = frozenset({"warning", "refresh_requested"})
#: Backoff step after ``too_many_websockets`` (Slack allows 10 sockets per app): start slow.
TOO_MANY_STEP = 4
_link_ids = itertools.count(1)


class LinkLost(Exception):
    """A link ended or could not be set up; the message says why (never a secret)."""


class LinkRefused(LinkLost):
    """Slack refused the app (link disabled, token refused): retrying cannot help."""


@dataclass(eq=False)
class _Link:
    ws: aiohttp.ClientWebSocketResponse
    link_id: int
    refresh: asyncio.Event = field(default_factory=asyncio.Event)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dispatches: set[asyncio.Task[None]] = field(default_factory=set)
    reason: str = ""
    disabled: bool = False


class SocketModeClient:
    """Keeps one Socket Mode link up until :meth:`stop` (two, briefly, during a refresh)."""

    def __init__(
        self,
        config: SlackConfig,
        api: SlackWebApi,
        handler: EnvelopeHandler,
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
        self._backoff = Backoff(
            config.reconnect_base_s,
            max(config.reconnect_max_s, config.reconnect_base_s),
            JITTER,
            self._rng.random,
            spread="above",
        )
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._links: set[_Link] = set()
        self._stopping = False
        self.connections = 0
        self.acked = 0
        self.refreshes = 0

    def start(self) -> None:
        """Start the connect/reconnect loop in the background."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="slack-socket")

    async def stop(self) -> None:
        """Close every link, cancel every task this client started and close the session."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for link in list(self._links):
            await self._close(link, wait_s=0.0)
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._status.set_state("stopped")

    async def _run(self) -> None:
        """Open links until stopped; back off after every loss; give up on a refusal."""
        backoff = self._backoff
        backoff.reset()
        failed_tries = 0
        while not self._stopping:
            self._status.set_state("connecting" if self.connections == 0 else "reconnecting")
            try:
                link = await self._open_link()
                failed_tries = 0
                backoff.reset()
                reason = await self._serve(link)
            except asyncio.CancelledError:
                raise
            except LinkRefused as exc:
                self._status.record_error(str(exc))
                self._status.set_state("failed", attempts=failed_tries + 1)
                log.error("slack.socket_refused", reason=str(exc))
                return
            except (LinkLost, SlackApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = _describe(exc)
                failed_tries += 1
            except Exception as exc:  # the loop must survive anything to stay honest
                reason = f"unexpected: {type(exc).__name__}"
                failed_tries += 1
                log.exception("slack.socket_error")
            self._status.record_error(reason)
            if self._stopping:
                return
            if "too_many_websockets" in reason:
                # More sockets now would only be refused again: start at the TOO_MANY_STEP-th wait.
                backoff.failures = max(backoff.failures, TOO_MANY_STEP - 1)
            delay = backoff.next_delay()
            self._status.set_state("reconnecting", attempts=failed_tries)
            log.warning(
                "slack.socket_lost",
                reason=reason,
                failed_tries=failed_tries,
                retry_in_s=round(delay, 3),
            )
            await self._sleep(delay)

    async def _open_link(self) -> _Link:
        """Ask for a socket URL, dial it and wait for ``hello``."""
        try:
            url = await self._api.connections_open()
        except SlackApiError as exc:
            if exc.error in REFUSALS:
                raise LinkRefused(f"apps.connections.open refused: {exc.error}") from None
            raise
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        ws = await self._session.ws_connect(
            url,
            autoping=False,  # our own deadline sees every frame, pongs included
            max_msg_size=self._cfg.max_envelope_bytes,
            timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
        )
        link = _Link(ws=ws, link_id=next(_link_ids))
        self._links.add(link)
        try:
            async with asyncio.timeout(self._cfg.hello_timeout_s):
                first = await ws.receive()
            if first.type != aiohttp.WSMsgType.TEXT:
                raise LinkLost(f"socket closed before hello ({first.type.name})")
            msg = parse_socket_message(first.data, max_bytes=self._cfg.max_envelope_bytes)
            if msg.kind == "disconnect" and msg.reason == "link_disabled":
                raise LinkRefused("Socket Mode is disabled for this app (link_disabled)")
            if msg.kind != "hello":
                raise LinkLost(f"first socket message is {msg.kind}, not hello")
        except TimeoutError:
            await self._close(link, wait_s=0.0)
            raise LinkLost("no hello in time") from None
        except (LinkLost, ProtocolError) as exc:
            await self._close(link, wait_s=0.0)
            raise LinkLost(str(exc)) if isinstance(exc, ProtocolError) else exc from None
        self.connections += 1
        self._status.set_state("connected", attempts=0)
        log.info("slack.socket_connected", link_id=link.link_id, connections=self.connections)
        return link

    async def _serve(self, link: _Link) -> str:
        """Read ``link`` (and its successors after refreshes) until one is lost; say why."""
        current = link
        while True:
            reader = asyncio.create_task(self._read(current), name=f"slack-read-{current.link_id}")
            refresh = asyncio.create_task(current.refresh.wait())
            try:
                await asyncio.wait({reader, refresh}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                refresh.cancel()
            if current.refresh.is_set() and not reader.done():
                try:
                    successor = await self._open_link()  # the old link is still being read
                except (LinkLost, SlackApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
                    log.warning(
                        "slack.refresh_failed", link_id=current.link_id, reason=_describe(e)
                    )
                    await reader
                else:
                    self.refreshes += 1
                    log.info("slack.socket_refreshed", old=current.link_id, new=successor.link_id)
                    await self._close(current, wait_s=self._cfg.sink_timeout_s + 1.0)
                    await asyncio.gather(reader, return_exceptions=True)
                    current = successor
                    continue
            await asyncio.gather(reader, return_exceptions=True)
            await self._close(current, wait_s=self._cfg.sink_timeout_s + 1.0)
            if current.disabled:
                raise LinkRefused("Socket Mode is disabled for this app (link_disabled)")
            return current.reason or "socket closed"

    async def _read(self, link: _Link) -> None:
        """Read frames until the link closes, turns silent or is told to go away."""
        ws = link.ws
        last = self._monotonic()
        pinged = False
        while True:
            silent = self._monotonic() - last
            if silent >= self._cfg.receive_deadline_s:
                link.reason = f"silent for {silent:.1f}s"
                log.warning("slack.socket_silent", link_id=link.link_id, silent_s=round(silent, 3))
                return
            limit = self._cfg.receive_deadline_s if pinged else self._cfg.ping_interval_s
            try:
                async with asyncio.timeout(max(0.001, limit - silent)):
                    frame = await ws.receive()
            except TimeoutError:
                if not pinged and self._monotonic() - last >= self._cfg.ping_interval_s:
                    pinged = True
                    try:
                        await ws.ping()
                    except (ConnectionError, RuntimeError):
                        link.reason = "ping failed"
                        return
                continue
            last, pinged = self._monotonic(), False
            if frame.type == aiohttp.WSMsgType.TEXT:
                if not self._on_text(link, frame.data):
                    return
            elif frame.type == aiohttp.WSMsgType.PING:
                await ws.pong(frame.data)
            elif frame.type in (aiohttp.WSMsgType.PONG, aiohttp.WSMsgType.BINARY):
                continue
            else:
                link.reason = f"socket {frame.type.name.lower()}"
                return

    def _on_text(self, link: _Link, data: str) -> bool:
        """Handle one text frame; False when the link must end now."""
        try:
            msg = parse_socket_message(data, max_bytes=self._cfg.max_envelope_bytes)
        except ProtocolError as exc:
            log.warning("slack.socket_bad_message", link_id=link.link_id, error=str(exc))
            return True
        if msg.kind == "disconnect":
            log.info("slack.socket_disconnect", link_id=link.link_id, reason=msg.reason)
            if msg.reason in REFRESH_REASONS:
                link.refresh.set()
                return True
            link.reason = f"disconnect: {msg.reason or 'unknown'}"
            link.disabled = msg.reason == "link_disabled"
            return False
        if msg.kind == "envelope":
            task = asyncio.create_task(self._dispatch(link, msg))
            link.dispatches.add(task)
            task.add_done_callback(link.dispatches.discard)
        return True

    async def _dispatch(self, link: _Link, msg: SocketMessage) -> None:
        try:
            ack = await self._handler(msg)
        except Exception:
            log.exception("slack.envelope_handler_error", envelope_id=msg.envelope_id)
            ack = False
        if not ack:
            return  # unacked: Slack delivers it again and the sink dedupes it
        try:
            async with link.send_lock:
                await link.ws.send_str(ack_frame(msg.envelope_id))
        except (ConnectionError, RuntimeError):
            log.info("slack.ack_lost", link_id=link.link_id, envelope_id=msg.envelope_id)
            return
        self.acked += 1

    async def _close(self, link: _Link, *, wait_s: float) -> None:
        """Let in-flight envelopes finish (so their acks go out on this link), then close it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while link.dispatches and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(link.dispatches), timeout=left)
        for task in list(link.dispatches):  # unacked: Slack re-delivers them on the new link
            task.cancel()
        await link.ws.close()
        self._links.discard(link)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LinkLost | SlackApiError):
        return str(exc)[:200]
    return f"{type(exc).__name__}: {str(exc)[:160]}"

"""A reference /ws client for long-lived programs: heartbeats, reconnect, lossless resume.

Use it as is::

    async with HubClient("ws://host:8080/ws", token) as client:
        await client.submit("job-1", "What is in this picture?", image_bytes)
        async for frame in client.frames():
            ...  # event, error, ops, subscribed, unsubscribed and missed frames

It answers server pings, notices a dead server itself (no frame for heartbeat + timeout),
reconnects with jittered, capped exponential backoff that resets after a stable period, resumes
with its last seq, and never hands the application a duplicate or out-of-order event, nor a second
terminal event for a job that already ended. Submits that
were sent but not yet answered are sent again after a reconnect (the server refuses a job id it
already has with ``duplicate_id``, which this client swallows).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from adapters.retry import Backoff

log = structlog.get_logger(__name__)

# Close codes after which reconnecting cannot help.
FATAL_CLOSE_CODES = frozenset({4001, 4005})
# Own jobs whose terminal event was handed over, remembered to drop a second one (see _on_event).
ENDED_JOBS_KEPT = 4096


class HubClientError(Exception):
    """The client stopped for good (bad token, session taken over, or given up)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class _Gap(Exception):
    """An event arrived out of order: reconnect and let the server replay."""


class HubClient:
    """One resumable session with the hub, kept alive across connections.

    Args:
        url: the ``ws://``/``wss://`` URL of ``/ws``.
        token: the client token (sent in ``hello`` only).
        session: a session id to resume (e.g. saved by a previous run), or None for a new one.
        last_seq: the last seq the application has handled in that session.
        heartbeat_timeout_s: the server's pong deadline; with its heartbeat, how long silence
            may last before the server counts as dead.
        backoff_initial_s / backoff_max_s: reconnect backoff bounds.
        stable_after_s: a connection that lived this long resets the backoff.
        should_retry: decides, given the failure and the attempt number, whether to go on.
        ack_every: acknowledge consumed events after this many (and on every ping).
        queue_max: frames buffered for the application; when full, reading stops (backpressure).
        open_timeout_s: deadline for connecting and for the ``welcome``.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        session: str | None = None,
        last_seq: int = 0,
        heartbeat_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 30.0,
        should_retry: Callable[[BaseException, int], bool] | None = None,
        ack_every: int = 100,
        queue_max: int = 10_000,
        open_timeout_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self.session = session
        self.last_seq = last_seq
        self.heartbeat_s: float | None = None
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self._should_retry = should_retry or (lambda exc, attempt: True)
        self.ack_every = ack_every
        self.open_timeout_s = open_timeout_s
        self._rng = rng or random.Random()
        # Equal jitter: each wait is drawn from the upper half of the doubling, capped ceiling.
        self.backoff = Backoff(
            backoff_initial_s, backoff_max_s, 0.5, self._rng.random, spread="below"
        )
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(queue_max)
        self._pending: dict[str, str] = {}
        self._resent: set[str] = set()
        self._ended: OrderedDict[str, None] = OrderedDict()
        self.second_terminals = 0
        self._topics: set[str] = set()
        self._ws: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._fatal: HubClientError | None = None
        self._consumed = last_seq
        self._acked = last_seq
        self.connected = asyncio.Event()
        self.connects = 0
        self.resumes = 0

    # --- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> HubClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the connection loop (returns at once; see :attr:`connected`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hub-client")

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._put_nowait_end()

    def _put_nowait_end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def wait_connected(self, within_s: float) -> None:
        """Wait until a ``welcome`` arrived (raises ``TimeoutError``)."""
        async with asyncio.timeout(within_s):
            await self.connected.wait()

    # --- what the application calls --------------------------------------------------------
    async def submit(
        self, job_id: str, prompt: str, image: bytes, max_tokens: int | None = None
    ) -> None:
        """Submit a job; it is (re)sent until the server answers it, across reconnects."""
        frame: dict[str, Any] = {
            "type": "submit",
            "id": job_id,
            "prompt": prompt,
            "image": base64.b64encode(image).decode("ascii"),
        }
        if max_tokens is not None:
            frame["max_tokens"] = max_tokens
        text = json.dumps(frame)
        self._pending[job_id] = text
        await self._send_if_connected(text)

    async def cancel(self, job_id: str) -> None:
        """Ask the server to cancel a job of this session."""
        self._pending.pop(job_id, None)
        await self._send_if_connected(json.dumps({"type": "cancel", "id": job_id}))

    async def subscribe(self, topic: str) -> None:
        """Follow a topic (kept across reconnects, also when the session is new)."""
        self._topics.add(topic)
        await self._send_if_connected(json.dumps({"type": "subscribe", "topic": topic}))

    async def unsubscribe(self, topic: str) -> None:
        """Stop following a topic."""
        self._topics.discard(topic)
        await self._send_if_connected(json.dumps({"type": "unsubscribe", "topic": topic}))

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        """Frames for the application, in order: events (each seq once), errors, ops, notices.

        A ``{"type":"missed","count":n}`` frame says the server could no longer replay ``n``
        events. Ends when the client is closed; raises :class:`HubClientError` if it gave up.
        """
        while True:
            item = await self._queue.get()
            if item is None:
                if self._fatal is not None:
                    raise self._fatal
                return
            if item.get("type") == "event":
                self._consumed = max(self._consumed, int(item["seq"]))
            yield item

    # --- the connection loop ---------------------------------------------------------------
    async def _send_if_connected(self, text: str) -> None:
        ws = self._ws
        if ws is None or not self.connected.is_set():
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)

    async def _run(self) -> None:
        backoff = self.backoff
        while not self._closing:
            started = time.monotonic()
            try:
                await self._connect_once()
                failure: BaseException = ConnectionError("connection ended")
            except HubClientError as exc:
                self._give_up(exc)
                return
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, _Gap) as exc:
                failure = exc
            finally:
                self._ws = None
                self.connected.clear()
            if self._closing:
                return
            if time.monotonic() - started >= self.stable_after_s:
                backoff.reset()
            attempt = backoff.failures
            if not self._should_retry(failure, attempt):
                self._give_up(HubClientError(f"gave up after {attempt + 1} attempts: {failure!r}"))
                return
            delay = backoff.next_delay()
            log.info(
                "hub_client_reconnect",
                attempt=attempt,
                delay_s=round(delay, 3),
                error=type(failure).__name__,
            )
            await asyncio.sleep(delay)

    def _give_up(self, exc: HubClientError) -> None:
        self._fatal = exc
        log.warning("hub_client_stopped", error=str(exc), code=exc.code)
        self._put_nowait_end()

    async def _connect_once(self) -> None:
        try:
            ws = await websockets.connect(
                self.url,
                open_timeout=self.open_timeout_s,
                ping_interval=None,
                compression=None,
                max_size=64 * 2**20,
            )
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise HubClientError("refused by the server", exc.response.status_code) from exc
            raise
        self._ws = ws
        try:
            await self._session_loop(ws)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code in FATAL_CLOSE_CODES:
                raise HubClientError(f"closed by the server: {exc.rcvd}", code) from exc
            raise
        finally:
            with contextlib.suppress(Exception):
                await ws.close()

    async def _session_loop(self, ws: Any) -> None:
        hello = {
            "type": "hello",
            "token": self._token,
            "session": self.session,
            "last_seq": self.last_seq if self.session else None,
        }
        await ws.send(json.dumps(hello))
        async with asyncio.timeout(self.open_timeout_s):
            welcome = json.loads(await ws.recv())
        if welcome.get("type") != "welcome":
            raise ConnectionError(f"expected welcome, got {welcome.get('type')!r}")
        await self._on_welcome(welcome)
        self.connected.set()
        for topic in sorted(self._topics):
            await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
        self._resent = set(self._pending)
        for text in list(self._pending.values()):
            await ws.send(text)
        silence = (self.heartbeat_s or 45.0) + self.heartbeat_timeout_s
        while True:
            try:
                async with asyncio.timeout(silence):
                    raw = await ws.recv()
            except TimeoutError:
                log.info("hub_client_server_silent", silence_s=silence)
                raise
            if not isinstance(raw, str):
                continue
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "ping":
                await ws.send(json.dumps({"type": "pong", "ts": frame.get("ts")}))
                await self._maybe_ack(ws, force=True)
            elif kind == "event":
                await self._on_event(frame)
                await self._maybe_ack(ws)
            elif kind == "bye":
                log.info("hub_client_bye", reason=frame.get("reason"))
                return
            elif kind == "error":
                job_id = frame.get("id")
                if job_id in self._resent and frame.get("code") == "duplicate_id":
                    self._resent.discard(job_id)
                    continue  # the server already had this job; its events follow
                if job_id is not None:
                    self._pending.pop(job_id, None)
                await self._queue.put(frame)
            elif kind != "pong":
                await self._queue.put(frame)

    async def _on_welcome(self, welcome: dict[str, Any]) -> None:
        self.connects += 1
        self.heartbeat_s = float(welcome.get("heartbeat") or 45.0)
        session = str(welcome["session"])
        missed = int(welcome.get("missed") or 0)
        if welcome.get("resumed"):
            self.resumes += 1
        elif self.session is not None:
            # A new session: its seqs start again at 1.
            self.last_seq = self._consumed = self._acked = 0
        self.session = session
        if missed:
            self.last_seq += missed
            await self._queue.put({"type": "missed", "count": missed, "session": session})
        log.info(
            "hub_client_welcome",
            session=session,
            resumed=bool(welcome.get("resumed")),
            missed=missed,
        )

    async def _on_event(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq")
        if not isinstance(seq, int) or seq <= self.last_seq:
            return  # a duplicate from a replay: the application has it already
        if seq != self.last_seq + 1:
            raise _Gap(f"expected seq {self.last_seq + 1}, got {seq}")
        job_id = frame.get("id")
        if isinstance(job_id, str) and "topic" not in frame:
            self._pending.pop(job_id, None)
            self._resent.discard(job_id)
            if frame.get("kind") in ("done", "error") and not self._end(job_id):
                # A job that ended just before its node died can also be ended on resume by the
                # server (the store had not seen its end yet): the first terminal event stands.
                self.second_terminals += 1
                log.info("hub_client_second_terminal_dropped", job_id=job_id, seq=seq)
                self.last_seq = seq
                return
        await self._queue.put(frame)
        self.last_seq = seq

    def _end(self, job_id: str) -> bool:
        """Record that ``job_id`` ended; False if it had ended already."""
        if job_id in self._ended:
            return False
        self._ended[job_id] = None
        if len(self._ended) > ENDED_JOBS_KEPT:
            self._ended.popitem(last=False)
        return True

    async def _maybe_ack(self, ws: Any, force: bool = False) -> None:
        consumed = min(self._consumed, self.last_seq)
        if consumed > self._acked and (force or consumed - self._acked >= self.ack_every):
            await ws.send(json.dumps({"type": "ack", "seq": consumed}))
            self._acked = consumed

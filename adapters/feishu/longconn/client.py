"""The asyncio long-connection client: endpoint, WebSocket, ping loop, acks, reconnect/backoff.

It moves bytes between a ``websockets`` connection and :class:`LongConnProtocol`; everything the
protocol decides (pings, deadlines, fragments, ack frames) happens in the core. Unlike Feishu's
official client it never blocks the event loop and lives inside the bridge's loop.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import structlog
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from adapters.feishu.config import FeishuConfig
from adapters.feishu.longconn.protocol import (
    ClientConfig,
    ConfigChanged,
    EventDelivery,
    LongConnProtocol,
)
from adapters.feishu.openapi import FeishuApiError, OpenApiClient, WsEndpoint
from adapters.feishu.status import StatusTracker

log = structlog.get_logger(__name__)

DeliveryHandler = Callable[[EventDelivery], Awaitable[int]]
_conn_ids = itertools.count(1)


class ConnectionLost(Exception):
    """The current connection ended; the message says why (never a secret)."""


def reconnect_delay(
    attempt: int, config: ClientConfig, *, base_s: float, cap_s: float, rng: random.Random
) -> float:
    """Seconds to wait before reconnect ``attempt`` (1-based).

    The first try waits a random part of Feishu's ``ReconnectNonce`` (so a fleet does not
    reconnect at once); later ones back off exponentially with jitter, capped by the smaller of
    our cap and Feishu's ``ReconnectInterval``.
    """
    ceiling_cap = min(cap_s, config.reconnect_interval_s)
    if attempt <= 1:
        return rng.uniform(0.0, min(config.reconnect_nonce_s, ceiling_cap))
    ceiling = min(ceiling_cap, base_s * 2 ** (attempt - 2))
    return rng.uniform(ceiling / 2, ceiling)


class LongConnClient:
    """Keeps one long connection to Feishu's event gateway up until :meth:`stop`."""

    def __init__(
        self,
        config: FeishuConfig,
        api: OpenApiClient,
        handler: DeliveryHandler,
        status: StatusTracker,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = config
        self._api = api
        self._handler = handler
        self._status = status
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._client_config = ClientConfig(
            ping_interval_s=config.ping_interval_s,
            reconnect_interval_s=config.reconnect_max_s,
            reconnect_nonce_s=min(30.0, config.reconnect_max_s),
        )
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._connected_at: float | None = None
        self.connections = 0
        self.acked = 0

    @property
    def client_config(self) -> ClientConfig:
        """The ClientConfig now in force (ours until Feishu sends one)."""
        return self._client_config

    def start(self) -> None:
        """Start the connect/reconnect loop in the background."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="feishu-longconn")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Close the connection and cancel every task this client started."""
        self._stopping = True
        tasks = [t for t in (self._task, *self._handlers) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        self._task = None
        self._handlers.clear()
        self._status.set_state("stopped")

    async def _run(self) -> None:
        attempts = 0
        while not self._stopping:
            started = self._monotonic()
            self._connected_at = None
            try:
                if self.connections == 0 and attempts == 0:
                    self._status.set_state("connecting")
                else:
                    self._status.set_state("reconnecting")
                endpoint = await self._api.ws_endpoint()
                self._client_config = self._client_config.merged(endpoint.client_config)
                await self._connect_once(endpoint)
            except asyncio.CancelledError:
                raise
            except (
                ConnectionLost,
                FeishuApiError,
                OSError,
                WebSocketException,
                TimeoutError,
            ) as exc:
                self._status.record_error(_describe(exc))
                log.warning("feishu.longconn_lost", reason=_describe(exc), attempts=attempts)
            except Exception as exc:  # the loop must survive anything to stay honest
                self._status.record_error(f"unexpected: {type(exc).__name__}")
                log.exception("feishu.longconn_error")
            if self._stopping:
                return
            up_since = self._connected_at
            if up_since is not None and self._monotonic() - up_since >= self._cfg.stable_after_s:
                attempts = 0
            attempts += 1
            limit = self._cfg.max_reconnect_attempts
            if limit < 0:
                limit = self._client_config.reconnect_count
            if 0 <= limit < attempts:
                self._status.set_state("failed", attempts=attempts)
                log.error("feishu.longconn_gave_up", attempts=attempts)
                return
            delay = reconnect_delay(
                attempts,
                self._client_config,
                base_s=self._cfg.reconnect_base_s,
                cap_s=self._cfg.reconnect_max_s,
                rng=self._rng,
            )
            self._status.set_state("reconnecting", attempts=attempts)
            log.info(
                "feishu.longconn_backoff",
                attempts=attempts,
                delay_s=round(delay, 3),
                after_s=round(self._monotonic() - started, 3),
            )
            await asyncio.sleep(delay)

    async def _connect_once(self, endpoint: WsEndpoint) -> None:
        """Run one connection until it fails (always by raising :class:`ConnectionLost`)."""
        service_id = _service_id(endpoint.url)
        conn_id = next(_conn_ids)
        try:
            ws = await websockets.connect(
                endpoint.url,
                open_timeout=self._cfg.api_timeout_s,
                ping_interval=None,  # Feishu wants its own CONTROL pings; we run those
                close_timeout=1.0,
                max_size=self._cfg.max_event_bytes + 64 * 1024,
            )
        except InvalidStatus as exc:
            headers = exc.response.headers
            raise ConnectionLost(
                f"handshake refused: http {exc.response.status_code} "
                f"status={headers.get('Handshake-Status', '')} "
                f"autherr={headers.get('Handshake-Autherrcode', '')}"
            ) from None
        connected_at = self._monotonic()
        self._connected_at = connected_at
        self.connections += 1
        proto = LongConnProtocol(
            service_id=service_id,
            config=self._client_config,
            now=connected_at,
            pong_timeout_s=self._cfg.pong_timeout_s,
            fragment_ttl_s=self._cfg.fragment_ttl_s,
            max_event_bytes=self._cfg.max_event_bytes,
        )
        self._status.set_state("connected", attempts=0)
        log.info("feishu.longconn_connected", conn_id=conn_id, service_id=service_id)
        send_lock = asyncio.Lock()
        try:
            await self._pump(ws, proto, send_lock, conn_id)
        except ConnectionLost:
            raise
        except ConnectionClosed as exc:
            raise ConnectionLost(f"closed: code {exc.rcvd.code if exc.rcvd else 'none'}") from None
        finally:
            await ws.close()

    async def _pump(
        self, ws: ClientConnection, proto: LongConnProtocol, lock: asyncio.Lock, conn_id: int
    ) -> None:
        while True:
            proto.tick(self._monotonic())
            await self._flush(ws, proto, lock)
            if proto.failure is not None:
                log.warning("feishu.longconn_failed", conn_id=conn_id, reason=proto.failure)
                raise ConnectionLost(proto.failure)
            timeout = max(0.0, proto.next_wakeup() - self._monotonic())
            try:
                async with asyncio.timeout(timeout):
                    message = await ws.recv()
            except TimeoutError:
                continue
            data = message.encode() if isinstance(message, str) else message
            proto.receive(data, self._monotonic())
            for event in proto.events_received():
                if isinstance(event, ConfigChanged):
                    self._client_config = event.config
                    log.info("feishu.longconn_config", ping_interval_s=event.config.ping_interval_s)
                else:
                    task = asyncio.create_task(self._dispatch(ws, proto, lock, event, conn_id))
                    self._handlers.add(task)
                    task.add_done_callback(self._handlers.discard)

    async def _dispatch(
        self,
        ws: ClientConnection,
        proto: LongConnProtocol,
        lock: asyncio.Lock,
        delivery: EventDelivery,
        conn_id: int,
    ) -> None:
        started = self._monotonic()
        try:
            code = await self._handler(delivery)
        except Exception:
            log.exception(
                "feishu.longconn_handler_error", conn_id=conn_id, message_id=delivery.message_id
            )
            code = 500
        proto.ack(delivery, code, biz_rt_ms=int((self._monotonic() - started) * 1000))
        try:
            await self._flush(ws, proto, lock)
        except (ConnectionClosed, OSError):
            # Unacked: Feishu re-delivers it on the next connection and the sink dedupes it.
            log.info("feishu.longconn_ack_lost", conn_id=conn_id, message_id=delivery.message_id)
            return
        if code == 200:
            self.acked += 1

    async def _flush(
        self, ws: ClientConnection, proto: LongConnProtocol, lock: asyncio.Lock
    ) -> None:
        async with lock:
            for data in proto.data_to_send():
                await ws.send(data)


def _service_id(url: str) -> int:
    values = parse_qs(urlsplit(url).query).get("service_id", ["0"])
    try:
        return int(values[0])
    except ValueError:
        return 0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ConnectionLost | FeishuApiError):
        return text[:200]
    return f"{type(exc).__name__}: {text[:160]}"

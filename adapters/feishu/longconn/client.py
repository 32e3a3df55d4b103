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
from adapters.reconnecting import ReconnectingClient
from adapters.retry import Backoff
from adapters.status import StatusTracker

log = structlog.get_logger(__name__)

DeliveryHandler = Callable[[EventDelivery], Awaitable[int]]
_conn_ids = itertools.count(1)


class ConnectionLost(Exception):
    """The current connection ended; the message says why (never a secret)."""


# Endpoint codes Feishu's SDKs retry (system busy, internal error); any other non-zero code
# (514 wrong credentials, 403 forbidden, 1000040344 no credential, ...) refuses the app itself.
RETRYABLE_ENDPOINT_CODES = frozenset({1, 1000040343})
HANDSHAKE_FORBIDDEN = 403
HANDSHAKE_AUTH_FAILED = 514
AUTH_EXCEEDS_CONN_LIMIT = 1000040350
JITTER = 0.2


class ConnectionRefused(ConnectionLost):
    """Feishu refused the app itself (credentials, a ban, the connection limit).

    Retrying soon cannot help, so the client shows ``failed`` and tries again only every
    ``refused_retry_s`` (or never). The message carries Feishu's code, never a secret.
    """


def reconnect_delay(step: int, config: ClientConfig, *, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait before the ``step``-th retry (1-based) since the backoff was reset.

    The first retry waits a random part of Feishu's ``ReconnectNonce`` (so a fleet does not
    reconnect at once), as Feishu's SDKs do. Later ones wait Feishu's ``ReconnectInterval`` (the
    SDKs' fixed wait between failed tries), doubling per step up to ``cap_s`` but never below
    that interval, plus up to 20 % jitter; a wait is never shorter than Feishu asked for.
    """
    base = config.reconnect_interval_s
    cap = max(cap_s, base)
    if step <= 1:
        return rng.uniform(0.0, min(config.reconnect_nonce_s, cap))
    return Backoff(base, cap, JITTER, rng.random, spread="above").delay(step - 2)


def refusal(exc: FeishuApiError) -> bool:
    """Whether an endpoint error refuses the app itself (see :data:`RETRYABLE_ENDPOINT_CODES`).

    Transport errors, HTTP failures and answers without a Feishu code (``code`` -1) are the
    service's trouble and worth a normal retry, as are the codes the SDKs retry.
    """
    return exc.code > 0 and exc.code not in RETRYABLE_ENDPOINT_CODES


class LongConnClient(ReconnectingClient):
    """Keeps one long connection to Feishu's event gateway up until :meth:`stop`."""

    loop_name = "feishu-longconn"

    def __init__(
        self,
        config: FeishuConfig,
        api: OpenApiClient,
        handler: DeliveryHandler,
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
        # Ours until Feishu's ClientConfig arrives with the endpoint (an endpoint that cannot be
        # reached at start-up is retried from reconnect_base_s, doubling to reconnect_max_s).
        self._client_config = ClientConfig(
            ping_interval_s=config.ping_interval_s,
            reconnect_interval_s=config.reconnect_base_s,
            reconnect_nonce_s=min(30.0, config.reconnect_max_s),
        )
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._connected_at: float | None = None
        self._conn_id: int | None = None  # the last connection tried, for the loop's log events
        self.connections = 0
        self.acked = 0

    @property
    def client_config(self) -> ClientConfig:
        """The ClientConfig now in force (ours until Feishu sends one)."""
        return self._client_config

    async def _run(self) -> None:
        """Connect, and after every loss try again until :meth:`stop` or giving up.

        Two counters, as Feishu's SDKs count: ``retries`` are the retries since the link was
        last up, and only they are limited by ``ReconnectCount`` (a retry that brings the link up
        is a success and starts the count afresh, however soon that link drops again). ``step``
        drives the waits and resets only after ``stable_after_s`` of a healthy link, so a link
        that flaps still backs off. A refusal (wrong credentials, ...) is ``failed`` at once and
        retried every ``refused_retry_s`` at most.
        """
        retries = 0  # retries since the link was last up (or since start)
        failed_tries = 0  # tries in a row that did not bring the link up (status "attempts")
        step = 0
        refused = False
        while not self._stopping:
            started = self._monotonic()
            self._connected_at = None
            if self.connections == 0 and failed_tries == 0:
                self._status.set_state("connecting")
            elif not refused:
                self._status.set_state("reconnecting")
            refused = False
            reason = ""
            try:
                endpoint = await self._api.ws_endpoint()
                self._client_config = self._client_config.merged(endpoint.client_config)
                await self._connect_once(endpoint)
            except asyncio.CancelledError:
                raise
            except ConnectionRefused as exc:
                refused, reason = True, _describe(exc)
            except FeishuApiError as exc:
                refused, reason = refusal(exc), _describe(exc)
            except (ConnectionLost, OSError, WebSocketException, TimeoutError) as exc:
                reason = _describe(exc)
            except Exception as exc:  # the loop must survive anything to stay honest
                reason = f"unexpected: {type(exc).__name__}"
                log.exception("feishu.longconn_error")
            self._status.record_error(reason)
            if self._stopping:
                return
            up_since = self._connected_at
            if up_since is not None:
                retries = failed_tries = 0
                if self._monotonic() - up_since >= self._cfg.stable_after_s:
                    step = 0
            else:
                failed_tries += 1
            log.warning(
                "feishu.longconn_lost",
                conn_id=self._conn_id,
                app_id=self._cfg.app_id,
                reason=reason,
                came_up=up_since is not None,
                failed_tries=failed_tries,
                refused=refused,
            )
            limit = self._cfg.max_reconnect_attempts
            if limit < 0:
                limit = self._client_config.reconnect_count
            if refused and self._cfg.refused_retry_s <= 0:
                limit = retries  # Feishu's SDKs stop for good on a refusal
            if 0 <= limit <= retries:
                self._status.set_state("failed", attempts=failed_tries)
                log.error(
                    "feishu.longconn_gave_up",
                    conn_id=self._conn_id,
                    app_id=self._cfg.app_id,
                    failed_tries=failed_tries,
                    retries=retries,
                    reason=reason,
                )
                return
            retries += 1
            step += 1
            if refused:
                delay = Backoff(
                    self._cfg.refused_retry_s,
                    self._cfg.refused_retry_s,
                    JITTER,
                    self._rng.random,
                    spread="above",
                ).delay(0)
                self._status.set_state("failed", attempts=failed_tries)
                log.error(
                    "feishu.longconn_refused",
                    conn_id=self._conn_id,
                    app_id=self._cfg.app_id,
                    reason=reason,
                    retry_in_s=round(delay, 3),
                )
            else:
                delay = reconnect_delay(
                    step, self._client_config, cap_s=self._cfg.reconnect_max_s, rng=self._rng
                )
                self._status.set_state("reconnecting", attempts=failed_tries)
            log.info(
                "feishu.longconn_backoff",
                conn_id=self._conn_id,
                retry=retries,
                step=step,
                delay_s=round(delay, 3),
                after_s=round(self._monotonic() - started, 3),
            )
            await self._sleep(delay)

    async def _connect_once(self, endpoint: WsEndpoint) -> None:
        """Run one connection until it fails (always by raising :class:`ConnectionLost`)."""
        service_id = _service_id(endpoint.url)
        conn_id = next(_conn_ids)
        self._conn_id = conn_id
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
            status = headers.get("Handshake-Status", "")
            autherr = headers.get("Handshake-Autherrcode", "")
            message = (
                f"handshake refused: http {exc.response.status_code} "
                f"status={status} autherr={autherr}"
            )
            # As Feishu's SDKs judge it: a ban, or an auth failure for exceeding the connection
            # limit, refuses the app; any other refusal is the gateway's and worth a retry.
            if status == str(HANDSHAKE_FORBIDDEN) or (
                status == str(HANDSHAKE_AUTH_FAILED) and autherr == str(AUTH_EXCEEDS_CONN_LIMIT)
            ):
                raise ConnectionRefused(message) from None
            raise ConnectionLost(message) from None
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
                elif event.kind != "event":
                    # Card (and unknown) frames get what Feishu's SDKs send them: nothing.
                    log.info(
                        "feishu.longconn_frame_ignored",
                        conn_id=conn_id,
                        kind=event.kind,
                        message_id=event.message_id,
                        trace_id=event.trace_id,
                    )
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

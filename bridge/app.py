"""The composition root: builds the store, engine, hub, adapters and HTTP routes and runs them.

Start order: bind the listening port (a process that cannot listen exits before it touches the
store), store (an SQLite file is locked for this process), hub, HTTP (so ``/healthz`` answers while
the model loads), engine load and warm-up, adapters, then the relay resumes IM jobs accepted before
a crash. Stop order is the reverse, within the grace period.

Exit codes of :func:`serve`: 0 after a clean stop; 1 when the port cannot be bound, the model
cannot be loaded (without ``--model-load-retry``), or a model load had to be abandoned at the end
of the grace period; 2 when the SQLite store is in use by another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from aiohttp import web

from adapters.base import Adapter
from bridge.cluster import Bus, JobQueue
from bridge.cluster.eventlog import EventLog
from bridge.components import engine_config, hub_config, shared_answer_cache
from bridge.config import Settings
from bridge.errors import error_response, json_errors
from bridge.fanout import ClusterFanout
from bridge.health import Readiness, add_health_routes
from bridge.heap import freeze_heap
from bridge.hub import Hub
from bridge.jobs.runner import JobRunner, JobSpec
from bridge.listen import bind_sockets, safe_url, site_urls
from bridge.logs import add_tap, remove_tap
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.observers import EngineMetrics
from bridge.platforms import Handler, webhook_routes
from bridge.relay import Publisher, Relay
from bridge.store import Store, StoreInUse, StoreUnavailable, open_store
from bridge.store.backoff import Backoff
from engine import Engine
from engine.load import LoadMonitor, LoadReport, MemInfo, cuda_mem_info
from engine.types import EngineLike

log = structlog.get_logger(__name__)

__all__ = ["BridgeApp", "engine_config", "hub_config", "serve", "shared_answer_cache"]

MAX_BODY_BYTES = 16 * 2**20
EXIT_FAILED = 1
EXIT_STORE_IN_USE = 2
#: Delays between model load attempts under ``--model-load-retry``.
MODEL_RETRY_INITIAL_S = 1.0
MODEL_RETRY_CAP_S = 60.0


class BridgeApp:
    """One bridge process: owns every component and the background tasks that tie them together."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: EngineLike | None = None,
        store: Store | None = None,
        adapters: list[Adapter] | None = None,
        clock: Callable[[], float] = time.time,
        mem_info: MemInfo = cuda_mem_info,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.store: Store = store or open_store(settings.store)
        self.engine: EngineLike = engine or Engine(
            engine_config(settings),
            observer=EngineMetrics(
                self.metrics, latency=lambda s: self.ops.chart.record_latency(s)
            ),
            shared_cache=shared_answer_cache(settings, self.store),
        )
        self.load = LoadMonitor(settings.max_batch, mem_info=mem_info)
        self.adapters: list[Adapter] = adapters if adapters is not None else self._build_adapters()
        # On a shared (Redis) store several nodes cooperate: IM jobs go through a Redis Streams
        # consumer group to whichever node has room, and their events cross nodes on the bus.
        # Sessions move between nodes over the same bus (the hub hands them off on resume).
        self.clustered = self.store.url.startswith(("redis://", "rediss://", "unix://"))
        node_id = f"{socket.gethostname()}:{settings.port}"
        bus: Bus | None = None
        events: EventLog | None = None
        queue: JobQueue | None = None
        if self.clustered:
            from bridge.cluster.redis_bus import RedisBus
            from bridge.cluster.redis_eventlog import RedisEventLog
            from bridge.cluster.redis_jobs import RedisJobQueue

            bus = RedisBus(self.store.url)
            # Job events cross nodes on a Redis stream (ordered, resumable), not on the bus.
            events = RedisEventLog(self.store.url, client_name=f"bridge-events:{node_id}")
            queue = RedisJobQueue(
                self.store.url, consumer=node_id, claim_idle_s=settings.cluster_lease
            )
        #: The one job runner: /ws sessions, IM messages and the HTTP API all run jobs on it.
        self.jobs = JobRunner(self.engine, on_end=self._job_ended)
        self.hub = Hub(
            hub_config(settings),
            engine=self.engine,
            store=self.store,
            metrics=self.metrics,
            bus=bus,
            events=events,
            node_id=node_id,
            runner=self.jobs,
        )
        self._bus = bus
        #: The cluster's event fan-out (the hub starts and stops it); None on a single node.
        self.fanout: ClusterFanout | None = self.hub.fanout
        publisher: Publisher = self.fanout or self.hub
        self.relay = Relay(
            self.store,
            self.engine,
            publisher,
            self.adapters,
            clock=clock,
            lease_s=settings.cluster_lease,
            sweep_s=max(0.5, settings.cluster_lease / 4),
            queue=queue,
            max_concurrency=max(4, 2 * settings.max_batch),
            runner=self.jobs,
        )
        self.draining = False
        self.started_at = clock()
        self._engine_error: str | None = None
        #: Why the process must exit (a model that cannot be loaded); set with ``failed``.
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self.model_retry = Backoff(MODEL_RETRY_INITIAL_S, MODEL_RETRY_CAP_S)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.web = self._build_web()
        self._runner: web.AppRunner | None = None
        self.urls: list[str] = []

    # --- construction -------------------------------------------------------------------------
    def _build_adapters(self) -> list[Adapter]:
        from bridge.platforms import build_adapters

        return build_adapters(self.settings, self.metrics, self.store)

    def _job_ended(self, spec: JobSpec, outcome: str) -> None:
        """Count a job's end by entry point and outcome (``bridge_jobs_total``)."""
        self.metrics.jobs_by_origin.labels(origin=spec.origin, outcome=outcome).inc()

    def _build_web(self) -> web.Application:
        # A body must carry the largest allowed image (base64 in JSON) like a /ws frame does.
        body_max = max(MAX_BODY_BYTES, self.settings.limits.max_frame_bytes)
        app = web.Application(client_max_size=body_max, middlewares=[json_errors])
        add_health_routes(app, self.readiness)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/ws", self._ws)
        for method, path, handler in webhook_routes(self.adapters, self.settings):
            app.router.add_route(method, path, self._unless_draining(handler))
        from bridge.dashboard.routes import setup_dashboard
        from bridge.ops import BridgeOpsSource

        self.ops = BridgeOpsSource(self)
        setup_dashboard(app, self.ops, self.settings.admin_token)
        from bridge.http.wiring import build_http_api

        self.http_api = build_http_api(self, body_max)
        self.http_api.setup(app)
        return app

    # --- routes -------------------------------------------------------------------------------
    async def _metrics(self, _request: web.Request) -> web.Response:
        await self.readiness()  # sets bridge_ready to what /readyz would answer now
        status = self.engine.status()
        self.metrics.engine_queue_depth.set(status.queue_depth)
        self.metrics.ws_connections.set(len(self.hub.connections()))
        self.metrics.ws_inflight_bytes.set(self.hub.inflight.used)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return error_response(503, "shutting_down", "the bridge is shutting down")
        return await self.hub.handle(request)

    def _unless_draining(self, handler: Handler) -> Handler:
        async def route(request: web.Request) -> web.StreamResponse:
            if self.draining:
                # Platforms re-deliver on a non-2xx answer, so nothing accepted is lost.
                return error_response(503, "shutting_down", "the bridge is shutting down")
            return await handler(request)

        return route

    async def readiness(self) -> Readiness:
        """Ready when the model is loaded, the store answers and we are not draining; carries the
        replica's load (weight 0 whenever not ready)."""
        reasons: list[str] = []
        components: dict[str, Any] = {}
        status = self.engine.status()
        components["engine"] = {"ready": status.ready, "model": status.model}
        if not status.ready:
            reasons.append(self._engine_error or status.reason or "model is loading")
        try:
            await asyncio.wait_for(self.store.ping(), 1.5)
            components["store"] = {"ok": True}
        except (StoreUnavailable, OSError, TimeoutError) as exc:
            components["store"] = {"ok": False}
            reasons.append(f"store unavailable: {exc or type(exc).__name__}")
        for adapter in self.adapters:
            st = adapter.status()
            components[adapter.platform] = st.to_dict() if hasattr(st, "to_dict") else str(st)
        if self.draining:
            reasons.append("shutting down")
        if any(w.device.startswith("cuda") for w in status.workers):
            # cudaMemGetInfo is a driver call: keep it off the loop, like every torch call.
            load = await asyncio.to_thread(self.load.report, status, not reasons)
        else:
            load = self.load.report(status, ready=not reasons)
        self._record_load(load)
        self.metrics.ready.set(0.0 if reasons else 1.0)
        return Readiness(not reasons, reasons, components, load.to_dict())

    def _record_load(self, load: LoadReport) -> None:
        m = self.metrics
        m.engine_load_weight.set(load.weight)
        m.engine_live_rows.set(load.live_rows)
        for device, mem in load.gpu.items():
            m.engine_gpu_memory_used.labels(device=device).set(mem.used_bytes)
            m.engine_gpu_memory_free.labels(device=device).set(mem.free_bytes)

    # --- lifecycle ----------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background task, keeping a strong reference until it ends."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", task=task.get_name(), error=repr(task.exception()))

    async def start(self) -> None:
        """Bind the port, open the store, start serving HTTP, then load the model and the rest.

        Raises:
            OSError: the port cannot be bound (nothing else was touched).
            StoreInUse: another process uses the SQLite file (the port is released again).
        """
        sockets = bind_sockets(self.settings.host, self.settings.port)
        try:
            await self.store.open()
        except StoreUnavailable as exc:
            # Redis may come later; readiness says why until it does.
            log.warning(
                "store_unavailable_at_start", store=safe_url(self.store.url), error=str(exc)
            )
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        await self.hub.start()
        add_tap(self.ops.errors.processor)
        self.ops.chart.start(self.ops.count_connections)
        self._runner = web.AppRunner(self.web, handle_signals=False, access_log=None)
        await self._runner.setup()
        for sock in sockets:
            await web.SockSite(self._runner, sock).start()
        self.urls = site_urls(self._runner, self.settings.host)
        self.spawn(self._start_engine(), "engine-start")

    async def _start_engine(self) -> None:
        """Load the model; on failure exit (``failed``) or, with ``--model-load-retry``, retry.

        The failure is logged once, as ``model_load_failed``, with the engine's one-line reason
        (for a model that cannot be fetched it says what to do).
        """
        while True:
            try:
                await self.engine.start()
                break
            except Exception as exc:
                if self.draining:
                    return  # stopping: a cancelled or interrupted load is no failure
                error = str(getattr(exc, "message", None) or exc) or type(exc).__name__
                if not self.settings.model_load_retry:
                    self._engine_error = f"model failed to load: {error}"
                    log.error("model_load_failed", model=self.settings.model, error=error)
                    self.failure = error
                    self.failed.set()
                    return
                delay = self.model_retry.next_delay()
                attempt = self.model_retry.failures
                self._engine_error = (
                    f"model failed to load (attempt {attempt}, next in {delay:.0f} s): {error}"
                )
                log.warning(
                    "model_load_retry",
                    model=self.settings.model,
                    attempt=attempt,
                    retry_in_s=round(delay, 2),
                    error=error,
                )
                await asyncio.sleep(delay)
        self.model_retry.reset()
        self._engine_error = None
        log.info("engine_ready", model=self.settings.model, status=self.engine.status().model)
        freeze_heap()
        for adapter in self.adapters:
            await adapter.start(self.relay.accept)
        await self.relay.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let clients resume elsewhere, drain jobs within the grace period."""
        grace = self.settings.grace if grace_s is None else grace_s
        self.draining = True
        deadline = asyncio.get_running_loop().time() + grace
        log.info("shutdown_begin", grace_s=grace)
        for adapter in self.adapters:
            with contextlib.suppress(Exception):
                await adapter.stop()
        # WebSocket jobs and IM jobs share the whole grace period; the hub's last store write
        # comes after both, so events the relay publishes while draining are kept for replay.
        await self.hub.shutdown(reason="shutdown", grace_s=max(0.5, grace), drain=self.relay.stop)
        await self.http_api.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        with contextlib.suppress(Exception):
            await self.engine.stop(grace_s=max(0.0, deadline - asyncio.get_running_loop().time()))
        if self._bus is not None:
            with contextlib.suppress(Exception):
                await self._bus.close()
        await self.ops.chart.stop()
        remove_tap(self.ops.errors.processor)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(Exception):
            await self.store.close()
        log.info("shutdown_done")


async def serve(settings: Settings) -> int:
    """Run the bridge until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    app = BridgeApp(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except StoreInUse as exc:
        print(f"bridge: error: {exc}", file=sys.stderr)
        return EXIT_STORE_IN_USE
    except OSError as exc:
        log.error("listen_failed", host=settings.host, port=settings.port, error=str(exc))
        return EXIT_FAILED
    base = app.urls[0]
    log.info(
        "bridge_started",
        urls=app.urls,
        ws=base.replace("http", "ws", 1) + "/ws",
        health=base + "/healthz",
        ready=base + "/readyz",
        metrics=base + "/metrics",
        dashboard=(base + "/dashboard") if settings.admin_token else None,
        webhooks=[base + path for _, path, _ in webhook_routes(app.adapters, settings)],
        model=settings.model,
        store=safe_url(settings.store),
    )
    signalled = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(app.failed.wait())
    await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if signalled.done():
        log.info("signal_received")
    else:
        code = EXIT_FAILED  # the model cannot be loaded: model_load_failed said why
    for task in (signalled, failed):
        task.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await app.stop(None if code == 0 else 0.0)
    if getattr(app.engine, "load_abandoned", False):
        # The load thread is stuck where it cannot see the cancel flag (a network call). All else
        # is stopped and the store closed; exit now rather than wait on it or race interpreter
        # shutdown against it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILED)
    return code

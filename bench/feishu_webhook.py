"""Benchmark: Feishu webhook acknowledgement latency at a fixed event rate over loopback HTTP.

A child process serves a small aiohttp app that mounts ``FeishuAdapter.handle_webhook`` with a
sink that records each message durably in SQLite (python's sqlite3 in a worker thread, WAL,
``synchronous=FULL``, dedupe on message id and event id). This process sends encrypted, signed
``im.message.receive_v1`` events open-loop at ``--rate`` per second (10% are re-deliveries) and
measures each acknowledgement from its scheduled send time, so a stalled server cannot hide
queueing delay. Run::

    python bench/feishu_webhook.py --rate 200 --seconds 15 [--target bridge]

With ``--target bridge`` the server is the real service instead: ``python -m bridge serve`` in
webhook mode with its SQLite store, relay and the tiny model answering every event, against a
minimal fake Feishu OpenAPI served by this process, so the acknowledgements compete with real
downloads, inference and card updates in the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.base import InboundMessage  # noqa: E402
from adapters.feishu import FeishuAdapter, FeishuConfig  # noqa: E402
from adapters.feishu.crypto import AESCipher, signature  # noqa: E402
from adapters.http import MockTransport  # noqa: E402
from bench.common import IMAGES  # noqa: E402

TOKEN = "bench-verification-token"
KEY = "bench-encrypt-key"


class SqliteSink:
    """Durable dedupe + inbox in SQLite with group commit (the real store comes later).

    Messages that arrive while a commit runs wait for the next one, which records them all in one
    transaction; each caller is answered only after the commit holding its message.
    """

    def __init__(self, path: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS dedupe (key TEXT PRIMARY KEY, expires REAL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS inbox (id TEXT PRIMARY KEY, payload TEXT)")
        self._pending: list[tuple[InboundMessage, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0

    def _record_many(self, messages: list[InboundMessage]) -> list[bool]:
        results: list[bool] = []
        expires = time.time() + 8 * 3600
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for msg in messages:
                keys = msg.dedupe_keys
                found = self._db.execute(
                    f"SELECT 1 FROM dedupe WHERE key IN ({','.join('?' * len(keys))})", keys
                ).fetchone()
                if found:
                    results.append(False)
                    continue
                self._db.executemany(
                    "INSERT INTO dedupe (key, expires) VALUES (?, ?)", [(k, expires) for k in keys]
                )
                self._db.execute(
                    "INSERT INTO inbox (id, payload) VALUES (?, ?)", (msg.message_id, msg.to_json())
                )
                results.append(True)
        return results

    async def __call__(self, msg: InboundMessage) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((msg, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            self.batches += 1
            try:
                results = await loop.run_in_executor(
                    self._pool, self._record_many, [m for m, _ in batch]
                )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)


async def serve(port: int, db_path: str) -> None:
    """The server side (child process).

    Logs are JSON lines in a file next to the database (as production ships them to a collector),
    so their cost is part of the measurement.
    """
    log_file = open(db_path + ".log", "w")  # noqa: SIM115, ASYNC230 - opened once at start-up
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(file=log_file),
        cache_logger_on_first_use=True,
    )
    cfg = FeishuConfig(
        mode="webhook",
        app_id="cli_bench",
        app_secret="bench-secret",
        verification_token=TOKEN,
        encrypt_key=KEY,
    )
    adapter = FeishuAdapter(
        cfg, http=MockTransport(lambda r: (_ for _ in ()).throw(AssertionError))
    )
    await adapter.start(SqliteSink(db_path))

    async def handle(request: web.Request) -> web.Response:
        resp = await adapter.handle_webhook(request.headers, await request.read())
        return web.json_response(resp.body, status=resp.status)

    app = web.Application(client_max_size=2 * 1024 * 1024)
    app.router.add_post("/webhooks/feishu", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


class FakeOpenApi:
    """A minimal Feishu OpenAPI on loopback: token, image download, reply and card updates.

    It also counts what the bridge did with each message, so a run proves every event was
    answered exactly once (one reply card per message, each ending in a final "done" card).
    """

    def __init__(self) -> None:
        self.photo = (IMAGES / "chelsea.jpg").read_bytes()
        self.replies: dict[str, int] = {}  # source message id -> reply cards posted
        self.reply_source: dict[str, str] = {}  # reply message id -> source message id
        self.done: set[str] = set()  # source message ids whose card reached "done"
        self.expected = 0  # set once known: ``all_done`` fires when that many are answered
        self.all_done = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        """Serve on an ephemeral loopback port."""
        app = web.Application()
        app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", self._token)
        app.router.add_get("/open-apis/im/v1/messages/{mid}/resources/{key}", self._resource)
        app.router.add_post("/open-apis/im/v1/messages/{mid}/reply", self._reply)
        app.router.add_patch("/open-apis/im/v1/messages/{mid}", self._patch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        """Close the listener."""
        if self.runner is not None:
            await self.runner.cleanup()

    async def _token(self, _r: web.Request) -> web.Response:
        return web.json_response({"code": 0, "tenant_access_token": "t-bench", "expire": 7200})

    async def _resource(self, _r: web.Request) -> web.Response:
        return web.Response(body=self.photo, content_type="image/jpeg")

    async def _reply(self, r: web.Request) -> web.Response:
        source = r.match_info["mid"]
        self.replies[source] = self.replies.get(source, 0) + 1
        reply_id = f"om_r_{source}"
        self.reply_source[reply_id] = source
        return web.json_response({"code": 0, "data": {"message_id": reply_id}})

    async def _patch(self, r: web.Request) -> web.Response:
        body = await r.json()
        if '"template":"green"' in body.get("content", ""):
            self.done.add(self.reply_source.get(r.match_info["mid"], "?"))
            if self.expected and len(self.done) >= self.expected:
                self.all_done.set()
        return web.json_response({"code": 0, "data": {}})


async def run_against_bridge(port: int, rate: float, seconds: float, tmp: str) -> dict[str, object]:
    """Start the real bridge in webhook mode, wait until ready, load it, wait for every answer."""
    fake = FakeOpenApi()
    await fake.start()
    args = [
        sys.executable, "-m", "bridge", "serve", "--port", str(port),
        "--store", f"sqlite:///{tmp}/bridge.db", "--log-format", "json",
        "--max-new-tokens", "32", "--feishu-mode", "webhook",
        "--feishu-app-id", "cli_bench", "--feishu-app-secret", "bench-secret",
        "--feishu-verification-token", TOKEN, "--feishu-encrypt-key", KEY,
        "--feishu-base-url", fake.base_url,
    ]  # fmt: skip
    server = _start_server(args, Path(tmp) / "bridge.log")
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(1200):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise SystemExit("the bridge did not become ready")
        result = await load(port, rate, seconds)
        # Every distinct message (the warm-up sends are among them) must get exactly one card.
        expected = len({source_index(i) for i in range(int(rate * seconds))})
        loop = asyncio.get_running_loop()
        load_end = loop.time()
        fake.expected = expected
        if len(fake.done) >= expected:
            fake.all_done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fake.all_done.wait(), 300)
        result.update(
            {
                "messages": expected,
                "answered": len(fake.done),
                "cards_posted": sum(fake.replies.values()),
                "messages_with_two_cards": sum(1 for n in fake.replies.values() if n > 1),
                "drain_s_after_load": round(loop.time() - load_end, 1),
            }
        )
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)
        await fake.stop()


def _start_server(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def source_index(i: int) -> int:
    """Which message send ``i`` carries: every tenth send re-delivers the message of ``i - 5``."""
    return i if i % 10 else max(0, i - 5)


def make_event(i: int, cipher: AESCipher) -> tuple[dict[str, str], bytes]:
    """One encrypted, signed image message event (message ``i``), as Feishu sends it."""
    event = {
        "schema": "2.0",
        "header": {
            "event_id": f"ev_bench_{i}",
            "event_type": "im.message.receive_v1",
            "create_time": "0",
            "token": TOKEN,
            "app_id": "cli_bench",
        },
        "event": {
            "sender": {"sender_id": {"open_id": "ou_bench"}, "sender_type": "user"},
            "message": {
                "message_id": f"om_bench_{i}",
                "chat_id": "oc_bench",
                "chat_type": "p2p",
                "message_type": "image",
                "content": json.dumps({"image_key": f"img_bench_{i}"}),
            },
        },
    }
    body = json.dumps(
        {"encrypt": cipher.encrypt(json.dumps(event).encode(), os.urandom(16))}
    ).encode()
    ts, nonce = str(int(time.time())), f"n{i}"
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "X-Lark-Request-Timestamp": ts,
        "X-Lark-Request-Nonce": nonce,
        "X-Lark-Signature": signature(ts, nonce, KEY, body),
    }
    return headers, body


async def load(port: int, rate: float, seconds: float) -> dict[str, object]:
    """Send events open-loop and collect acknowledgement latencies."""
    cipher = AESCipher(KEY)
    total = int(rate * seconds)
    events = [make_event(source_index(i), cipher) for i in range(total)]
    url = f"http://127.0.0.1:{port}/webhooks/feishu"
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        for headers, body in events[:20]:  # warm up connections and code paths
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.1

        async def one(i: int) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            headers, body = events[i]
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            latencies.append(loop.time() - scheduled)

        await asyncio.gather(*(one(i) for i in range(total)))
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "events": total,
        "rate_per_s": rate,
        "statuses": statuses,
        "p50_ms": round(q[49] * 1000, 2),
        "p90_ms": round(q[89] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
    }


def main() -> None:
    """Parse arguments; run the server (``--serve``) or the whole benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument(
        "--target",
        choices=("adapter", "bridge"),
        default="adapter",
        help="adapter: the webhook core with a SQLite sink; bridge: the whole real service",
    )
    parser.add_argument("--serve", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.port, args.serve))
        return
    if args.target == "bridge":
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(run_against_bridge(args.port, args.rate, args.seconds, tmp))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", f"{tmp}/bench.db", "--port", str(args.port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise SystemExit("the benchmark server did not start")
            server.stdout.close()
            result = asyncio.run(load(args.port, args.rate, args.seconds))
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""A fake Slack on loopback: Web API methods, a Socket Mode WebSocket, and private files.

Built from Slack's documented wire format: ``apps.connections.open`` (app-level token) answers
a socket URL; the socket says ``hello``, carries envelopes and ``disconnect`` messages and records
the ``{"envelope_id"}`` acks; ``chat.postMessage``/``chat.update`` (bot token, JSON bodies) are
recorded and can answer HTTP 429 with ``Retry-After`` or ``ok: false, error: ratelimited``;
``files-pri`` downloads need the bot token (without it Slack serves an HTML login page).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

APP_TOKEN = "xapp-1-A0FAKE-1234-fakeapptokenSECRET"
BOT_TOKEN = "xoxb-1234-5678-fakebottokenSECRET"
TEAM = "T0FAKE"
APP_ID = "A0FAKE"


@dataclass
class Fault:
    """One injected failure for the next call of ``method``."""

    method: str
    status: int = 200
    error: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    served_at: float | None = None  # loop time when a call got this failure


@dataclass
class Link:
    """One Socket Mode connection as the fake sees it."""

    number: int
    ws: web.WebSocketResponse
    silent: asyncio.Event = field(default_factory=asyncio.Event)
    said_hello: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Call:
    """A recorded Web API call."""

    method: str
    body: dict[str, Any]
    at: float


def message_envelope(
    envelope_id: str,
    *,
    event_id: str = "Ev0001",
    channel: str = "C0FAKE",
    ts: str = "1700000000.000100",
    text: str = "",
    files: list[dict[str, Any]] | None = None,
    retry_attempt: int = 0,
    **event_extra: Any,
) -> dict[str, Any]:
    """An ``events_api`` envelope carrying a ``message`` event as Slack sends it."""
    event: dict[str, Any] = {
        "type": "message",
        "channel": channel,
        "user": "U0FAKEUSER",
        "text": text,
        "ts": ts,
        "event_ts": ts,
        "channel_type": "channel",
        **event_extra,
    }
    if files is not None:
        event["files"] = files
        event.setdefault("subtype", "file_share")
    return {
        "envelope_id": envelope_id,
        "type": "events_api",
        "accepts_response_payload": False,
        "retry_attempt": retry_attempt,
        "retry_reason": "timeout" if retry_attempt else "",
        "payload": {
            "token": "legacy-verification-token",
            "team_id": TEAM,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": 1700000000,
            "authorizations": [{"team_id": TEAM, "user_id": "U0BOT", "is_bot": True}],
        },
    }


class FakeSlack:
    """The fake service: ``api_url`` for the adapter, controls and records for assertions."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, bytes]] = {}  # path -> (mimetype, bytes)
        self.faults: list[Fault] = []
        self.calls: list[Call] = []
        self.posted: dict[str, dict[str, Any]] = {}  # ts -> {"channel", "thread_ts", "text"}
        self.updates: list[Call] = []
        self.posts: list[tuple[str, Call]] = []  # (ts, call) of each accepted chat.postMessage
        self.pending: list[dict[str, Any]] = []  # socket messages kept until a link says hello
        self.down = False  # an outage: links are closed and apps.connections.open answers 503
        self.acks: list[tuple[int, str]] = []  # (link number, envelope_id)
        self.links: list[Link] = []
        self.metadata: dict[str, dict[str, Any]] = {}  # ts -> message metadata as posted
        self.opens = 0
        self.tickets: list[str] = []  # the ticket of every socket URL handed out
        self.file_requests: list[tuple[str, str]] = []  # (path, authorization header)
        self.link_disabled = False
        self.hello = True
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base = ""

    @property
    def api_url(self) -> str:
        """What ``--slack-base-url`` points at."""
        return f"{self.base}/api"

    def add_file(self, file_id: str, name: str, mimetype: str, data: bytes) -> dict[str, Any]:
        """Serve a private file; returns the ``files[]`` entry of a message carrying it."""
        path = f"/files-pri/{TEAM}-{file_id}/{name}"
        self.files[path] = (mimetype, data)
        return {
            "id": file_id,
            "name": name,
            "mimetype": mimetype,
            "filetype": mimetype.split("/")[-1],
            "size": len(data),
            "url_private": f"{self.base}{path}",
            "url_private_download": f"{self.base}/files-pri/{TEAM}-{file_id}/download/{name}",
        }

    def fail_next(
        self, method: str, *, status: int = 200, error: str = "", **headers: str
    ) -> Fault:
        """Make the next call of ``method`` fail (HTTP ``status`` and/or Slack ``error``)."""
        fault = Fault(method, status, error, headers)
        self.faults.append(fault)
        return fault

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)
        app.router.add_get("/link/", self._socket)
        app.router.add_get("/files-pri/{rest:.+}", self._file)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for link in self.links:
            link.closed.set()
            await link.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- controls ---------------------------------------------------------------------------
    def open_links(self) -> list[Link]:
        """Links not yet closed."""
        return [ln for ln in self.links if not ln.closed.is_set() and not ln.ws.closed]

    async def wait_links(self, count: int, limit_s: float = 10.0) -> Link:
        """Wait until ``count`` links were made in all; the newest one."""
        for _ in range(int(limit_s * 100)):
            if len(self.links) >= count:
                return self.links[count - 1]
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {len(self.links)} links, wanted {count}")

    async def send(self, link: Link, message: dict[str, Any]) -> None:
        """Send one socket message on ``link``."""
        await link.ws.send_str(json.dumps(message))

    async def push(self, message: dict[str, Any]) -> None:
        """Send ``message`` on the newest open link, or keep it for the next one (as Slack
        holds events for an app while it has no socket)."""
        links = [ln for ln in self.open_links() if ln.said_hello]
        if self.down or not links:
            self.pending.append(message)
            return
        await self.send(links[-1], message)

    async def take_down(self) -> None:
        """An outage: close every link; until ``bring_up`` no new link can be opened."""
        self.down = True
        for link in self.open_links():
            link.closed.set()
            await link.ws.close()

    def bring_up(self) -> None:
        """End the outage; kept messages go out on the next link after its ``hello``."""
        self.down = False

    async def wait_acks(self, count: int, limit_s: float = 10.0) -> None:
        for _ in range(int(limit_s * 100)):
            if len(self.acks) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.acks)} acks, wanted {count}: {self.acks}")

    # --- handlers ---------------------------------------------------------------------------
    def _fault(self, method: str) -> Fault | None:
        for fault in self.faults:
            if fault.method == method:
                self.faults.remove(fault)
                return fault
        return None

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        auth = request.headers.get("Authorization", "")
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return web.json_response({"ok": False, "error": "invalid_json"})
        loop = asyncio.get_running_loop()
        self.calls.append(Call(method, body, loop.time()))
        fault = self._fault(method)
        if fault is not None:
            fault.served_at = loop.time()
            payload = {"ok": False, "error": fault.error or "fatal_error"}
            return web.json_response(payload, status=fault.status, headers=fault.headers)
        if method == "apps.connections.open":
            if self.down:
                return web.Response(status=503, text="service unavailable")
            if auth != f"Bearer {APP_TOKEN}":
                return web.json_response({"ok": False, "error": "invalid_auth"})
            self.opens += 1
            ticket = f"faketicket{self.opens:04d}SECRET"  # a credential: one socket URL each
            self.tickets.append(ticket)
            url = f"ws://{self.base.split('://', 1)[1]}/link/?ticket={ticket}&app_id={APP_ID}"
            return web.json_response({"ok": True, "url": url})
        if auth != f"Bearer {BOT_TOKEN}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if method == "conversations.replies":
            return self._replies(dict(request.query))  # a read method: query/form args only
        channel = body.get("channel")
        text = body.get("text")
        if not isinstance(channel, str) or not channel:
            return web.json_response({"ok": False, "error": "channel_not_found"})
        if not isinstance(text, str) or not text:
            return web.json_response({"ok": False, "error": "no_text"})
        if method == "chat.postMessage":
            ts = f"1700001000.{next(self._ts):06d}"
            thread = body.get("thread_ts")
            self.posted[ts] = {"channel": channel, "thread_ts": thread, "text": text[:40_000]}
            if isinstance(body.get("metadata"), dict):
                self.metadata[ts] = body["metadata"]
            self.posts.append((ts, Call(method, body, loop.time())))
            message = {"type": "message", "text": text, "ts": ts, "bot_id": "B0FAKE"}
            return web.json_response({"ok": True, "channel": channel, "ts": ts, "message": message})
        if method == "chat.update":
            ts = body.get("ts")
            if not isinstance(ts, str) or ts not in self.posted:
                return web.json_response({"ok": False, "error": "message_not_found"})
            self.posted[ts]["text"] = text[:40_000]
            self.updates.append(Call(method, body, loop.time()))
            return web.json_response({"ok": True, "channel": channel, "ts": ts, "text": text})
        return web.json_response({"ok": False, "error": "unknown_method"})

    def _replies(self, args: dict[str, str]) -> web.Response:
        channel, thread = args.get("channel"), args.get("ts")
        if not channel or not thread:
            return web.json_response({"ok": False, "error": "channel_not_found"})
        messages: list[dict[str, Any]] = [{"type": "message", "ts": thread, "user": "U0FAKEUSER"}]
        for ts, post in self.posted.items():
            if post["channel"] != channel or post["thread_ts"] != thread:
                continue
            item: dict[str, Any] = {"type": "message", "ts": ts, "text": post["text"],
                                    "bot_id": "B0FAKE", "thread_ts": thread}  # fmt: skip
            if args.get("include_all_metadata") == "true" and ts in self.metadata:
                item["metadata"] = self.metadata[ts]
            messages.append(item)
        return web.json_response({"ok": True, "messages": messages, "has_more": False})

    async def _file(self, request: web.Request) -> web.Response:
        path = request.path.replace("/download/", "/")
        self.file_requests.append((request.path, request.headers.get("Authorization", "")))
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            return web.Response(text="<html>Sign in to Slack</html>", content_type="text/html")
        entry = self.files.get(path)
        if entry is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=entry[1], content_type=entry[0])

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        link = Link(number=len(self.links) + 1, ws=ws)
        self.links.append(link)
        if self.down:  # a URL handed out before the outage: the socket goes nowhere
            link.closed.set()
            await ws.close()
            return ws
        if self.link_disabled:
            await ws.send_str(json.dumps({"type": "disconnect", "reason": "link_disabled"}))
        elif self.hello:
            await ws.send_str(
                json.dumps(
                    {
                        "type": "hello",
                        "num_connections": len(self.open_links()),
                        "debug_info": {"host": "fake-slack", "approximate_connection_time": 60},
                        "connection_info": {"app_id": APP_ID},
                    }
                )
            )
            link.said_hello = True
            kept, self.pending = self.pending, []
            for message in kept:
                await ws.send_str(json.dumps(message))
        reader = asyncio.ensure_future(self._read(link))
        silent = asyncio.ensure_future(link.silent.wait())
        closed = asyncio.ensure_future(link.closed.wait())
        await asyncio.wait({reader, silent, closed}, return_when=asyncio.FIRST_COMPLETED)
        if link.silent.is_set():
            reader.cancel()  # no more reads: pings go unanswered, nothing is sent
            await closed
        for task in (reader, silent, closed):
            task.cancel()
        link.closed.set()
        await ws.close()
        return ws

    async def _read(self, link: Link) -> None:
        async for msg in link.ws:
            if msg.type != WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if isinstance(data, dict) and isinstance(data.get("envelope_id"), str):
                self.acks.append((link.number, data["envelope_id"]))

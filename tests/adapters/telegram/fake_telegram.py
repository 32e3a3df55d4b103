"""A fake Telegram Bot API on loopback, built from the Bot API documentation.

``POST|GET /bot<token>/<method>`` with JSON (or query) parameters answers ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error_code": ..., "description": ...}``; files come from
``GET /file/bot<token>/<file_path>``. Implemented: getMe, getUpdates (long poll: waits up to
``timeout`` seconds for an update, and forgets every update below ``offset``, which is how
Telegram confirms them), getFile, the file download, sendMessage, editMessageText ("message is not
modified" when nothing changes). Faults: a 429 with ``parameters.retry_after`` for the next call
of a method, and 5xx. :meth:`FakeTelegram.post_webhook` delivers an update the way Telegram's
webhook does (``X-Telegram-Bot-Api-Secret-Token``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

TOKEN = "123456789:AAFakeTokenForTestsOnly-xyz_0123456789"
BOT_ID = 123456789
BOT_USERNAME = "vision_test_bot"
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)


@dataclass
class Sent:
    """A message the bot sent, with its current text and its edits."""

    message_id: int
    chat_id: int
    text: str
    reply_to: int | None
    edits: list[tuple[float, str]]
    posted_at: float = 0.0  # monotonic (= the test's loop time) when sendMessage was accepted
    posted_text: str = ""  # the text as first sent (``text`` is the latest)


@dataclass
class Fault:
    """An error answer queued for the next call of one method; ``served_at`` once answered."""

    status: int
    retry_after: int
    served_at: float | None = None


class FakeTelegram:
    """The fake service: ``base_url`` for the adapter; queues, records and faults for tests."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id -> (file_path, bytes)
        self.updates: list[dict[str, Any]] = []  # not yet confirmed, update_id ascending
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (method, params) in order
        self.sent: list[Sent] = []
        self.rejected_calls: list[tuple[str, int]] = []  # (method, error_code) answered !ok
        self.edit_times: list[tuple[float, int]] = []  # (monotonic, chat_id) of each edit
        self.downloads: list[str] = []
        self._faults: dict[str, list[Fault]] = {}  # method -> faults, next first
        self._update_ids = itertools.count(1000)
        self._message_ids = itertools.count(5000)
        self._changed = asyncio.Condition()
        self._closing = False
        self.gates: dict[str, asyncio.Event] = {}  # method -> calls held, then dropped
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # --- set-up ------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for gate in self.gates.values():
            gate.set()
        async with self._changed:  # long polls in flight answer now
            self._closing = True
            self._changed.notify_all()
        self._closing = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add_file(self, file_id: str, data: bytes, file_path: str | None = None) -> None:
        self.files[file_id] = (file_path or f"photos/{file_id}.jpg", data)

    def fail_next(self, method: str, *, status: int = 429, retry_after: int = 1) -> Fault:
        """Answer the next call of ``method`` with ``status`` (429 carries ``retry_after``)."""
        fault = Fault(status, retry_after)
        self._faults.setdefault(method, []).append(fault)
        return fault

    async def push(self, update: dict[str, Any]) -> dict[str, Any]:
        """Queue an update for getUpdates (an ``update_id`` is assigned when missing)."""
        update = {"update_id": next(self._update_ids), **update}
        async with self._changed:
            self.updates.append(update)
            self._changed.notify_all()
        return update

    def new_update_id(self) -> int:
        return next(self._update_ids)

    async def post_webhook(
        self, url: str, update: dict[str, Any], secret: str | None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """POST ``update`` to a webhook as Telegram does; (status, decoded JSON body or text)."""
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        body = raw if raw is not None else json.dumps(update).encode()
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=body, headers=headers) as resp,
        ):
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    def replies_to(self, chat_id: int, message_id: int) -> list[Sent]:
        return [s for s in self.sent if s.chat_id == chat_id and s.reply_to == message_id]

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    # --- the API -----------------------------------------------------------------------------
    async def _method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _fail(401, "Unauthorized")
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return _fail(400, "Bad Request: can't parse JSON")
            if isinstance(body, dict):
                params.update(body)
        self.calls.append((method, params))
        gate = self.gates.get(method)
        if gate is not None:
            # A black-holed call: no answer until the gate is set, and then it was never done
            # (as if it never reached Telegram), so a killed caller left nothing behind.
            await gate.wait()
            return _fail(502, "Bad Gateway")
        faults = self._faults.get(method)
        if faults:
            fault = faults.pop(0)
            fault.served_at = time.monotonic()
            status, retry_after = fault.status, fault.retry_after
            self.rejected_calls.append((method, status))
            if status == 429:
                return _fail(
                    429,
                    f"Too Many Requests: retry after {retry_after}",
                    parameters={"retry_after": retry_after},
                )
            return _fail(status, "Internal Server Error")
        handler = {
            "getMe": self._get_me,
            "getUpdates": self._get_updates,
            "getFile": self._get_file,
            "sendMessage": self._send_message,
            "editMessageText": self._edit_message_text,
        }.get(method)
        if handler is None:
            return _fail(404, "Not Found")
        answer = await handler(params)
        if isinstance(answer, web.Response):
            self.rejected_calls.append((method, answer.status))
        return answer

    async def _get_me(self, _params: dict[str, Any]) -> web.Response:
        return _ok(
            {
                "id": BOT_ID,
                "is_bot": True,
                "first_name": "Vision Test",
                "username": BOT_USERNAME,
                "can_join_groups": True,
                "can_read_all_group_messages": False,
                "supports_inline_queries": False,
            }
        )

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        try:
            offset = int(params.get("offset", 0))
            timeout = float(params.get("timeout", 0))
            limit = int(params.get("limit", 100))
        except (TypeError, ValueError):
            return _fail(400, "Bad Request: wrong parameters")
        async with self._changed:
            if offset:
                self.updates = [u for u in self.updates if u["update_id"] >= offset]
            deadline = time.monotonic() + timeout
            while not self.updates and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    break
            return _ok(self.updates[: max(1, min(limit, 100))])

    async def _get_file(self, params: dict[str, Any]) -> web.Response:
        file_id = params.get("file_id")
        if not isinstance(file_id, str) or file_id not in self.files:
            return _fail(400, "Bad Request: invalid file_id")
        path, data = self.files[file_id]
        return _ok(
            {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "file_size": len(data),
                "file_path": path,
            }
        )

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _fail(401, "Unauthorized")
        path = request.match_info["path"]
        self.downloads.append(path)
        for stored_path, data in self.files.values():
            if stored_path == path:
                return web.Response(body=data, content_type="image/jpeg")
        return _fail(404, "Not Found")

    async def _send_message(self, params: dict[str, Any]) -> web.Response:
        chat_id, text = params.get("chat_id"), params.get("text")
        if not isinstance(chat_id, int):
            return _fail(400, "Bad Request: chat not found")
        if not isinstance(text, str) or not text.strip():
            return _fail(400, "Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > 4096:
            return _fail(400, "Bad Request: message is too long")
        reply = params.get("reply_parameters")
        reply_to = reply.get("message_id") if isinstance(reply, dict) else None
        sent = Sent(next(self._message_ids), chat_id, text, reply_to, [], time.monotonic(), text)
        self.sent.append(sent)
        return _ok(self._message(sent))

    async def _edit_message_text(self, params: dict[str, Any]) -> web.Response:
        chat_id, mid, text = params.get("chat_id"), params.get("message_id"), params.get("text")
        if not isinstance(text, str) or not text.strip():
            return _fail(400, "Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > 4096:
            return _fail(400, "Bad Request: MESSAGE_TOO_LONG")
        for sent in self.sent:
            if sent.chat_id == chat_id and sent.message_id == mid:
                if sent.text == text:
                    return _fail(400, NOT_MODIFIED)
                sent.text = text
                sent.edits.append((time.monotonic(), text))
                self.edit_times.append((time.monotonic(), chat_id))
                return _ok(self._message(sent))
        return _fail(400, "Bad Request: message to edit not found")

    @staticmethod
    def _message(sent: Sent) -> dict[str, Any]:
        return {
            "message_id": sent.message_id,
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "Vision Test"},
            "chat": {"id": sent.chat_id, "type": "private" if sent.chat_id > 0 else "group"},
            "date": int(time.time()),
            "text": sent.text,
        }


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _fail(code: int, description: str, **extra: Any) -> web.Response:
    body = {"ok": False, "error_code": code, "description": description, **extra}
    return web.json_response(body, status=code)


# --- update builders (shapes from the Bot API's Update, Message, PhotoSize, Document) ----------
def user(uid: int = 42, username: str = "alice") -> dict[str, Any]:
    return {"id": uid, "is_bot": False, "first_name": "Alice", "username": username}


def chat(chat_id: int = 42, kind: str = "private") -> dict[str, Any]:
    if kind == "private":
        return {"id": chat_id, "type": "private", "first_name": "Alice"}
    return {"id": chat_id, "type": kind, "title": "Test group"}


def photo_sizes(file_id: str, sizes: tuple[int, ...] = (1200, 30000, 90000)) -> list[Any]:
    """PhotoSize list, smallest first as Telegram sends it; ``sizes`` are the file sizes."""
    return [
        {
            "file_id": f"{file_id}-{i}",
            "file_unique_id": f"uniq-{file_id}-{i}",
            "width": 90 * (i + 1) * 4,
            "height": 60 * (i + 1) * 4,
            "file_size": size,
        }
        for i, size in enumerate(sizes)
    ]


def message(
    message_id: int,
    *,
    chat_id: int = 42,
    chat_type: str = "private",
    text: str | None = None,
    caption: str | None = None,
    photo: list[Any] | None = None,
    entities: list[Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "message_id": message_id,
        "from": user(),
        "chat": chat(chat_id, chat_type),
        "date": 1_764_806_400,
    }
    if text is not None:
        msg["text"] = text
        if entities is not None:
            msg["entities"] = entities
    if caption is not None:
        msg["caption"] = caption
        if entities is not None:
            msg["caption_entities"] = entities
    if photo is not None:
        msg["photo"] = photo
    msg.update(extra)
    return msg


def mention(text: str, handle: str = "@" + BOT_USERNAME) -> list[dict[str, Any]]:
    """A ``mention`` entity for ``handle`` in ``text`` (offsets in UTF-16 code units)."""
    start = text.index(handle)
    offset = len(text[:start].encode("utf-16-le")) // 2
    return [{"type": "mention", "offset": offset, "length": len(handle.encode("utf-16-le")) // 2}]

"""Answers on WeCom: a placeholder text first, then the final answer in one or more texts.

WeCom cannot edit a text message once sent, so there is no streaming: ``update`` only remembers
the text so far, and ``finish`` sends the final answer, split into texts of at most 2048 UTF-8
bytes (WeCom's limit on ``text.content``), at most ``max_parts`` of them, the last one cut with
an ellipsis when the answer is longer still.
"""

from __future__ import annotations

import structlog

from adapters.base import ReplyError
from adapters.wecom.api import WeComApi, WeComApiError

log = structlog.get_logger(__name__)

MAX_TEXT_BYTES = 2048
ELLIPSIS = "…"


def split_text(text: str, max_parts: int, limit: int = MAX_TEXT_BYTES) -> list[str]:
    """``text`` in pieces of at most ``limit`` UTF-8 bytes, cut at a line or word end if near.

    Beyond ``max_parts`` pieces the last piece ends with an ellipsis and the rest is dropped.
    An empty text gives one piece of one space (WeCom refuses empty content).
    """
    if not text.strip():
        return [" "]
    parts: list[str] = []
    rest = text
    while rest:
        if len(rest.encode()) <= limit:
            parts.append(rest)
            break
        if len(parts) == max_parts - 1:
            parts.append(_cut(rest, limit - len(ELLIPSIS.encode())) + ELLIPSIS)
            break
        head = _cut(rest, limit)
        for sep in ("\n", " "):
            at = head.rfind(sep)
            if at >= len(head) // 2:
                head = head[: at + 1]
                break
        parts.append(head)
        rest = rest[len(head) :]
    return parts


def _cut(text: str, limit: int) -> str:
    """The longest prefix of ``text`` that fits in ``limit`` UTF-8 bytes (never splits a char)."""
    return text.encode()[:limit].decode("utf-8", "ignore")


class WeComReplyStream:
    """One answer to one user: the placeholder is already sent; ``finish`` sends the answer once.

    Attributes:
        texts_sent: how many texts this stream sent (the placeholder is not counted).
    """

    def __init__(
        self,
        api: WeComApi,
        *,
        source_message_id: str,
        to_user: str,
        reply_message_id: str,
        max_parts: int,
    ) -> None:
        self._api = api
        self._source_id = source_message_id
        self._to_user = to_user
        self._reply_id = reply_message_id
        self._max_parts = max_parts
        self._latest = ""
        self._closed = False
        self.texts_sent = 0

    @property
    def reply_message_id(self) -> str:
        """WeCom's ``msgid`` of the placeholder text."""
        return self._reply_id

    @property
    def closed(self) -> bool:
        """Whether ``finish`` or ``fail`` ran."""
        return self._closed

    async def update(self, text_so_far: str) -> None:
        """Remember the answer so far; nothing is sent (WeCom texts cannot be edited)."""
        if not self._closed:
            self._latest = text_so_far

    async def finish(self, final_text: str) -> None:
        """Send the final answer (once per stream).

        Raises:
            ReplyError: a text could not be sent.
        """
        await self._close(final_text, "done")

    async def fail(self, apology: str) -> None:
        """Send a short apology instead of an answer (once per stream).

        Raises:
            ReplyError: the text could not be sent.
        """
        await self._close(apology, "failed")

    async def _close(self, text: str, state: str) -> None:
        if self._closed:
            return
        self._closed = True
        for part in split_text(text, self._max_parts):
            try:
                await self._api.send_text(self._to_user, part)
            except WeComApiError as exc:
                raise ReplyError(f"answer to {self._source_id}: {exc}") from None
            self.texts_sent += 1
        log.info(
            "wecom.reply_closed",
            message_id=self._source_id,
            reply_id=self._reply_id,
            state=state,
            texts=self.texts_sent,
        )

"""Answers in DingTalk: one final message per question, to the sessionWebhook or the robot API.

A plain DingTalk robot message cannot be edited after it is sent, so a reply is not streamed:
:meth:`DingTalkReply.update` only remembers the text, and ``finish``/``fail`` post one message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from adapters.base import ReplyError
from adapters.dingtalk.openapi import DingTalkApiError

log = structlog.get_logger(__name__)

Poster = Callable[[str], Awaitable[None]]


class DingTalkReply:
    """The reply to one message: nothing is posted until the answer is final."""

    def __init__(self, post: Poster, *, source_message_id: str, reply_message_id: str) -> None:
        self._post = post
        self._source_id = source_message_id
        self._reply_id = reply_message_id
        self._closed = False
        self.latest = ""

    @property
    def reply_message_id(self) -> str:
        """The bridge's id of this reply (``dingtalk:<msgId>``; DingTalk gives none to edit)."""
        return self._reply_id

    @property
    def closed(self) -> bool:
        """Whether ``finish`` or ``fail`` ran."""
        return self._closed

    async def update(self, text_so_far: str) -> None:
        """Remember the answer so far; DingTalk cannot edit a sent message, so nothing is sent."""
        if not self._closed:
            self.latest = text_so_far

    async def finish(self, final_text: str) -> None:
        """Post the final answer (once).

        Raises:
            ReplyError: it could not be posted.
        """
        await self._close(final_text, "done")

    async def fail(self, apology: str) -> None:
        """Post a short apology instead of an answer (once).

        Raises:
            ReplyError: it could not be posted.
        """
        await self._close(apology, "failed")

    async def _close(self, text: str, state: str) -> None:
        if self._closed:
            return
        try:
            await self._post(text)
        except DingTalkApiError as exc:
            raise ReplyError(f"reply to {self._source_id}: {exc}") from None
        self._closed = True
        log.info("dingtalk.reply_closed", message_id=self._source_id, state=state)

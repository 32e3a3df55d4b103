"""A streamed answer in one Telegram message: ``sendMessage`` once, then paced ``editMessageText``.

Telegram allows about one edit a second per chat, so edits go through the adapter's shared
per-chat :class:`~adapters.pacing.Pacer` and a :class:`~adapters.pacing.Coalescer` (newest text
wins). An edit that changes nothing ("message is not modified") counts as done. Texts longer than
Telegram's 4096 characters are cut, ending in an ellipsis.
"""

from __future__ import annotations

import structlog

from adapters.base import ReplyError
from adapters.pacing import Coalescer, Pacer
from adapters.telegram.api import NOT_MODIFIED, BotApi, TelegramApiError
from adapters.telegram.config import MAX_TEXT

log = structlog.get_logger(__name__)

PLACEHOLDER = "…"
ELLIPSIS = "…"


def fit_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` UTF-16 code units (ending in an ellipsis when cut), never empty."""
    if not text.strip():
        return PLACEHOLDER
    units = text.encode("utf-16-le", "surrogatepass")
    if len(units) <= 2 * limit:
        return text
    cut = units[: 2 * (limit - 1)].decode("utf-16-le", "ignore")  # drops a split surrogate pair
    return cut + ELLIPSIS


class TelegramReplyStream:
    """Edits one posted reply as the model writes."""

    def __init__(
        self, api: BotApi, pacer: Pacer, *, chat_id: str, source_id: str, reply_message_id: str
    ) -> None:
        self._api = api
        self._pacer = pacer
        self._chat_id = chat_id
        self._source_id = source_id
        self._reply_id = reply_message_id
        self._coalescer = Coalescer(
            self._edit, pace=self._pace, name=f"telegram-{reply_message_id}"
        )

    @property
    def reply_message_id(self) -> str:
        """Telegram's ``message_id`` of the reply (as a string)."""
        return self._reply_id

    @property
    def edits_sent(self) -> int:
        """Edits Telegram accepted so far."""
        return self._coalescer.sends

    async def update(self, text_so_far: str) -> None:
        """Record the answer so far; an edit is scheduled, never awaited here."""
        self._coalescer.offer(fit_text(text_so_far))

    async def finish(self, final_text: str) -> None:
        """Show the final answer.

        Raises:
            ReplyError: the final edit could not be delivered.
        """
        await self._close(final_text, "done")

    async def fail(self, apology: str) -> None:
        """Replace the reply with a short apology.

        Raises:
            ReplyError: the edit could not be delivered.
        """
        await self._close(apology, "failed")

    async def aclose(self) -> None:
        """Stop the background edits without a final one (shutdown)."""
        await self._coalescer.cancel()

    async def _close(self, text: str, state: str) -> None:
        try:
            await self._coalescer.close(fit_text(text))
        except TelegramApiError as exc:
            raise ReplyError(f"final edit of reply failed: {exc}") from None
        log.info(
            "telegram.reply_closed",
            message_id=self._source_id,
            reply_id=self._reply_id,
            state=state,
            edits=self._coalescer.sends,
        )

    async def _pace(self) -> None:
        await self._pacer.wait(self._chat_id)

    async def _edit(self, text: str) -> None:
        try:
            await self._api.call(
                "editMessageText",
                {"chat_id": int(self._chat_id), "message_id": int(self._reply_id), "text": text},
            )
        except TelegramApiError as exc:
            if exc.error_code == 400 and NOT_MODIFIED in exc.description:
                return
            raise

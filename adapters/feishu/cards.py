"""Interactive card JSON for streamed answers (Feishu message card schema 1.0)."""

from __future__ import annotations

import json
from typing import Any, Literal

CardState = Literal["thinking", "streaming", "done", "failed"]

# Feishu refuses card content over ~30 KB; CJK text takes 3 bytes a character in UTF-8.
MAX_CARD_TEXT_CHARS = 8000
_TITLES: dict[CardState, tuple[str, str]] = {
    "thinking": ("Looking at your image…", "blue"),
    "streaming": ("Answering…", "blue"),
    "done": ("Answer", "green"),
    "failed": ("Sorry", "red"),
}


def answer_card(text: str, state: CardState) -> dict[str, Any]:
    """A card showing ``text`` with a header for ``state``; shared so it can be updated by PATCH."""
    title, colour = _TITLES[state]
    body = _truncate(text) if text else ("…" if state in ("thinking", "streaming") else " ")
    if state == "streaming":
        body += " ▌"
    return {
        "config": {"wide_screen_mode": True, "update_multi": True},
        "header": {"title": {"tag": "plain_text", "content": title}, "template": colour},
        "elements": [{"tag": "div", "text": {"tag": "plain_text", "content": body}}],
    }


def card_content(card: dict[str, Any]) -> str:
    """The ``content`` string Feishu expects for an interactive message."""
    return json.dumps(card, ensure_ascii=False, separators=(",", ":"))


def text_content(text: str) -> str:
    """The ``content`` string of a plain text message."""
    return json.dumps({"text": _truncate(text)}, ensure_ascii=False, separators=(",", ":"))


def _truncate(text: str) -> str:
    if len(text) <= MAX_CARD_TEXT_CHARS:
        return text
    return text[: MAX_CARD_TEXT_CHARS - 1] + "…"

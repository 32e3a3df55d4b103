"""Making user text safe to put in a chat template: valid Unicode, and never a control token.

Two hostile prompts used to fail a whole batch: a lone UTF-16 surrogate (the tokenizer raises
``TypeError``) and the literal spelling of the processor's image placeholder, which the processor
expands into image tokens and then counts against the images it got (``ValueError``). Worse than
a failure, a prompt spelling ``<|im_end|>`` or ``<|im_start|>`` could end the user turn and speak
as the assistant.

:class:`PromptGuard` is built from a loaded processor, so it covers every architecture the same
way: it collects every special and added token spelling the tokenizer knows plus the processor's
own placeholder strings, and breaks each occurrence in user text with a WORD JOINER (U+2060, an
invisible character with no meaning) after its first character. The broken spelling tokenises as
plain text, and the processor's placeholder search can never find it. The guard verifies this
against the tokenizer when it is built and falls back to stronger escapes for any spelling the
tokenizer still maps to a special id (a normaliser that drops U+2060, say).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

WORD_JOINER = "\u2060"
REPLACEMENT = "\ufffd"
# Tried in order for each spelling; the last one, dropping the spelling, always works.
_BREAKS = (WORD_JOINER, " ")
_MAX_PASSES = 8


def is_valid_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode: no lone surrogate (U+D800..U+DFFF) in it.

    JSON lets a client spell ``"\\ud800"``; Python decodes it to a ``str`` that UTF-8 cannot
    encode and that tokenizers refuse.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD; an escaped surrogate pair that
    arrived as two code points is joined into the character it spells."""
    if is_valid_text(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def special_spellings(processor: Any) -> set[str]:
    """Every string ``processor`` would read as a control token rather than as text.

    The tokenizer's special tokens and all its added tokens (``<|vision_start|>``, ``<think>``,
    ...), plus the processor's ``*_token`` attributes (the image and video placeholders it
    expands, e.g. ``<image>``, ``<|image_pad|>``, ``<start_of_image>``). Single characters and
    plain words among the non-special added tokens are left out: they are ordinary text.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    found: set[str] = set()
    found.update(_strings(getattr(tokenizer, "all_special_tokens", ())))
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, dict):
        for added in decoder.values():
            content = getattr(added, "content", added)
            if not isinstance(content, str):
                continue
            if getattr(added, "special", False) or _looks_like_markup(content):
                found.add(content)
    for holder in (processor, tokenizer):
        for name in dir(holder):
            if not name.endswith("_token") or name.startswith("_"):
                continue
            try:
                value = getattr(holder, name)
            except Exception:  # some tokenizer properties raise when unset
                continue
            found.update(_strings([value]))
    return {s for s in found if len(s) >= 2 and s.strip()}


class PromptGuard:
    """Neutralises control-token spellings in user text for one processor (thread-safe)."""

    def __init__(self, spellings: Iterable[str], breaks: dict[str, str] | None = None) -> None:
        self._spellings = sorted({s for s in spellings if len(s) >= 2}, key=len, reverse=True)
        self._breaks = dict(breaks or {})
        self._pattern = (
            re.compile("|".join(re.escape(s) for s in self._spellings)) if self._spellings else None
        )

    @classmethod
    def for_processor(cls, processor: Any) -> PromptGuard:
        """The guard for ``processor``, each spelling's escape checked against its tokenizer."""
        tokenizer = getattr(processor, "tokenizer", processor)
        spellings = special_spellings(processor)
        special_ids = _special_ids(tokenizer)
        breaks: dict[str, str] = {}
        for spelling in spellings:
            for mark in _BREAKS:
                broken = spelling[0] + mark + spelling[1:]
                if not _encodes_special(tokenizer, broken, special_ids):
                    breaks[spelling] = mark
                    break
            else:
                breaks[spelling] = ""  # no mark helps: the spelling is dropped (U+FFFD)
                log.warning("engine.prompt_guard_drops", spelling=spelling)
        return cls(spellings, breaks)

    @property
    def spellings(self) -> tuple[str, ...]:
        """The spellings neutralised, longest first."""
        return tuple(self._spellings)

    def clean(self, text: str) -> str:
        """``text`` as valid Unicode in which no control-token spelling survives.

        Each occurrence gets its break mark after the first character; passes repeat until no
        spelling is left (a broken spelling may uncover another, e.g. ``<<image>>``).
        """
        text = valid_text(text)
        if self._pattern is None:
            return text
        for _ in range(_MAX_PASSES):
            if self._pattern.search(text) is None:
                return text
            text = self._pattern.sub(self._break, text)
        # Pathological nesting: whatever is still there goes entirely.
        return self._pattern.sub(REPLACEMENT, text)

    def _break(self, match: re.Match[str]) -> str:
        spelling = match.group(0)
        mark = self._breaks.get(spelling, WORD_JOINER)
        if not mark:
            return REPLACEMENT
        return spelling[0] + mark + spelling[1:]


def _looks_like_markup(content: str) -> bool:
    """``<...>``, ``[...]``, ``<|...|>``-like tokens: not a word, not whitespace."""
    return len(content) >= 2 and not content.strip().isalnum() and not content.isspace()


def _strings(values: Iterable[Any]) -> set[str]:
    out: set[str] = set()
    for value in values:
        if isinstance(value, str):
            out.add(value)
        elif isinstance(value, list | tuple):
            out.update(v for v in value if isinstance(v, str))
        else:
            content = getattr(value, "content", None)  # an AddedToken
            if isinstance(content, str):
                out.add(content)
    return out


def _special_ids(tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in getattr(tokenizer, "all_special_ids", ()) or ():
        if isinstance(value, int):
            ids.add(value)
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, dict):
        for token_id, added in decoder.items():
            content = getattr(added, "content", "")
            if getattr(added, "special", False) or _looks_like_markup(str(content)):
                ids.add(int(token_id))
    return ids


def _encodes_special(tokenizer: Any, text: str, special_ids: set[int]) -> bool:
    """Whether ``text`` (in context: after and before a word) tokenises to a special id."""
    try:
        ids = tokenizer(f"a {text} b", add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that cannot even encode it: play safe
        return True
    return any(int(i) in special_ids for i in ids)

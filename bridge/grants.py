"""Topic grants: which client token may follow which IM chat topics on /ws.

A grant is ``TOKEN=PATTERN``, where PATTERN is a case-sensitive glob (``*``, ``?``, ``[...]``) over
topic names such as ``chat:feishu:oc_abc``. Without a matching grant a ``subscribe`` to a chat topic
is refused with ``forbidden``; admin tokens may follow every topic (they run the service anyway).

Pure functions and one small class: no I/O, no hub imports, so :mod:`bridge.config` validates
grants with the same code the hub enforces them with.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Final

#: Longest pattern accepted (topics are at most 256 characters).
MAX_PATTERN_CHARS: Final = 256
#: Characters of topic names plus the glob syntax.
_PATTERN_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:@/+=-*?[]!"
)
#: Where a pattern may start; also how ``TOKEN=PATTERN`` is split (see :func:`parse_grant`).
_PATTERN_START: Final = re.compile(r"=(?=chat:|\*)")


def check_pattern(pattern: str) -> str:
    """Validate one grant pattern and return it.

    A pattern starts with ``chat:`` or ``*`` (grants are about chat topics; ``ops`` stays
    admin-only), uses only topic characters and glob syntax, and compiles.

    Raises:
        ValueError: with a message that quotes the pattern (patterns are not secret).
    """
    if not pattern:
        raise ValueError("a topic grant needs a pattern after '='")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a topic pattern is longer than {MAX_PATTERN_CHARS} characters")
    if not (pattern.startswith("chat:") or pattern.startswith("*")):
        raise ValueError(f"topic pattern {pattern!r} must start with 'chat:' or '*'")
    if not set(pattern) <= _PATTERN_CHARS:
        raise ValueError(f"topic pattern {pattern!r} holds characters no topic has")
    try:
        re.compile(fnmatch.translate(pattern))
    except re.error:
        raise ValueError(f"topic pattern {pattern!r} is not a valid glob") from None
    return pattern


def parse_grant(text: str) -> tuple[str, str]:
    """Split ``TOKEN=PATTERN`` into (token, pattern).

    The split is at the first ``=`` followed by ``chat:`` or ``*``, so tokens that contain ``=``
    (base64 padding) work: ``abc==chat:feishu:*`` is token ``abc=`` and pattern ``chat:feishu:*``.

    Raises:
        ValueError: the text has no such ``=``, the token is empty or malformed, or the pattern is
            invalid. The message never contains the token.
    """
    match = _PATTERN_START.search(text)
    if match is None:
        raise ValueError("a topic grant must be TOKEN=PATTERN, PATTERN starting 'chat:' or '*'")
    token, pattern = text[: match.start()], text[match.end() :]
    if not token:
        raise ValueError("a topic grant needs a token before '='")
    if len(token) > 512 or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError("a topic grant's token must be printable, without spaces, <= 512 chars")
    return token, check_pattern(pattern)


class TopicGrants:
    """The grants of every token, looked up by the token's label (the hub never keeps tokens here).

    Args:
        grants: (token label, pattern) pairs, in the order configured.
    """

    __slots__ = ("_by_label", "_compiled")

    def __init__(self, grants: Iterable[tuple[str, str]]) -> None:
        by_label: dict[str, list[str]] = {}
        for label, pattern in grants:
            patterns = by_label.setdefault(label, [])
            if pattern not in patterns:
                patterns.append(pattern)
        self._by_label: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in by_label.items()}
        # One regex per label: a subscribe is one match however many patterns the token has.
        self._compiled = {
            label: re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
            for label, patterns in self._by_label.items()
        }

    def allows(self, label: str | None, topic: str) -> bool:
        """Whether the token labelled ``label`` holds a grant matching ``topic``."""
        if label is None:
            return False
        compiled = self._compiled.get(label)
        return compiled is not None and compiled.match(topic) is not None

    def by_label(self) -> Mapping[str, tuple[str, ...]]:
        """Each token label's patterns, for the dashboard (labels only, never tokens)."""
        return dict(self._by_label)

"""Per-row streaming for batched generation: split each step's tokens by row, decode them
incrementally, and stop a row at its EOS, its token limit or its cancellation.

Transformers' stock streamers handle batch size 1 only; this one keeps a decoder per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Decode = Callable[[Sequence[int]], str]
_REPLACEMENT = "\ufffd"


class RowDecoder:
    """Incremental detokenizer for one row that never emits a split multi-byte character.

    It decodes a short window (the last emitted token as context plus the new ones) rather than
    the whole row each step, and holds text back while it ends in U+FFFD, the sign of an
    incomplete UTF-8 sequence. Concatenating everything returned equals the row's final text.
    """

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens up to here are already emitted

    @property
    def tokens(self) -> list[int]:
        """The token ids seen so far."""
        return self._tokens

    def push(self, token: int) -> str:
        """Add one token; return the text that is now complete (possibly empty)."""
        self._tokens.append(token)
        return self._step(final=False)

    def flush(self) -> str:
        """Return whatever is still held back, even an incomplete character."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self._read >= len(self._tokens):
            return ""
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if not final and (len(after) <= len(before) or after.endswith(_REPLACEMENT)):
            return ""
        delta = after[len(before) :] if after.startswith(before) else after
        self._prefix = self._read
        self._read = len(self._tokens)
        return delta


@dataclass(slots=True)
class RowState:
    """Where one row of a batch stands."""

    max_tokens: int
    decoder: RowDecoder
    produced: int = 0
    done: bool = False
    reason: str = ""
    text: list[str] = field(default_factory=list)


class BatchStreamer:
    """Feed each decode step's tokens (one per row) and learn which rows are finished.

    Callbacks fire on the generating thread: ``on_text(row, text)`` with each new piece and
    ``on_end(row, reason)`` once per row, where reason is ``eos``, ``length`` or ``stopped``.
    ``should_stop(row)`` is polled every step so a cancelled or expired job stops promptly.
    """

    def __init__(
        self,
        max_tokens: Sequence[int],
        eos_ids: set[int],
        decode: Decode,
        on_text: Callable[[int, str], None],
        on_end: Callable[[int, str], None],
        should_stop: Callable[[int], bool],
    ) -> None:
        self.rows = [RowState(max_tokens=m, decoder=RowDecoder(decode)) for m in max_tokens]
        self._eos = eos_ids
        self._on_text = on_text
        self._on_end = on_end
        self._should_stop = should_stop
        self.steps = 0
        self.active_row_steps = 0  # row-steps that produced a token for a live row

    def step(self, tokens: Sequence[int]) -> list[bool]:
        """Consume one token per row; return each row's finished flag."""
        self.steps += 1
        for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            if row.done:
                continue
            if self._should_stop(i):
                self._end(i, "stopped", flush=False)
                continue
            row.produced += 1
            self.active_row_steps += 1
            if token in self._eos:
                self._end(i, "eos")
                continue
            piece = row.decoder.push(token)
            if piece:
                row.text.append(piece)
                self._on_text(i, piece)
            if row.produced >= row.max_tokens:
                self._end(i, "length")
        return [row.done for row in self.rows]

    def finish(self) -> None:
        """End every row still open (generation stopped for all rows at once)."""
        for i, row in enumerate(self.rows):
            if not row.done:
                self._end(i, "length")

    def text(self, row: int) -> str:
        """The whole text of a row so far."""
        return "".join(self.rows[row].text)

    def _end(self, i: int, reason: str, flush: bool = True) -> None:
        row = self.rows[i]
        row.done = True
        row.reason = reason
        if flush:
            rest = row.decoder.flush()
            if rest:
                row.text.append(rest)
                self._on_text(i, rest)
        self._on_end(i, reason)

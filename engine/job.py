"""A job in flight: its request, its state shared between the loop and worker threads, and the
handle the caller iterates.

Events are decided on any thread but delivered on the event loop, in order, through the
:class:`Dispatcher`; exactly one terminal event (``Done`` or ``Failed``) is ever delivered.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog

from engine.types import Delta, Done, Failed, JobEvent, JobRequest, Usage

if TYPE_CHECKING:
    from engine.vision import VisionRef

log = structlog.get_logger(__name__)


class Dispatcher:
    """Moves events from worker threads to the event loop with one wake-up per decode step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._local = threading.local()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Collect events posted inside the block on this thread and hand them over at its end."""
        pending: list[tuple[Job, JobEvent]] | None = getattr(self._local, "pending", None)
        if pending is not None:  # nested: the outer block flushes
            yield
            return
        self._local.pending = []
        try:
            yield
        finally:
            items = self._local.pending
            self._local.pending = None
            if items:
                self._call(_deliver_all, items)

    def flush(self) -> None:
        """Hand over what this thread collected so far inside ``batch()`` (one per decode step)."""
        pending: list[tuple[Job, JobEvent]] | None = getattr(self._local, "pending", None)
        if pending:
            self._local.pending = []
            self._call(_deliver_all, pending)

    def post(self, job: Job, event: JobEvent) -> None:
        """Queue ``event`` for delivery to ``job``'s handle on the loop."""
        pending: list[tuple[Job, JobEvent]] | None = getattr(self._local, "pending", None)
        if pending is not None:
            pending.append((job, event))
        else:
            self._call(_deliver_all, [(job, event)])

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed at shutdown: nobody is listening any more
            log.debug("engine.dispatch_after_close")


def _deliver_all(items: list[tuple[Job, JobEvent]]) -> None:
    for job, event in items:
        job.deliver(event)


class Job:
    """Engine-side state of one submitted job.

    ``finished`` flips exactly once, under a lock, on whichever thread decides the outcome;
    later deltas or outcomes from other threads are dropped.
    """

    def __init__(
        self,
        request: JobRequest,
        max_tokens: int,
        timeout_s: float,
        dispatcher: Dispatcher,
        on_terminal: Callable[[Job, Done | Failed], None],
    ) -> None:
        self.request = request
        self.job_id = request.job_id
        self.max_tokens = max_tokens
        self.submitted_at = time.monotonic()
        self.deadline = self.submitted_at + timeout_s
        self.image: Any = None  # the decoded PIL image, set by the decode thread
        self.cache_key: str | None = None
        # Vision cache: the key (and, on a hit, the features) instead of a decoded image, and
        # how to decode it after all if the replica cannot use them.
        self.vision: VisionRef | None = None
        self.reload: Callable[[], Any] | None = None
        self.attempts = 0
        self.started = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._dispatcher = dispatcher
        self._on_terminal = on_terminal
        self._lock = threading.Lock()
        self._finished = False
        self._sent: list[str] = []
        self._sent_len = 0
        self._verify = False  # a rerun must regenerate exactly what was already streamed
        self._queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._delivered_terminal = False
        self.timer: asyncio.TimerHandle | None = None
        self.on_closed: Callable[[Job], None] | None = None  # loop side, after the terminal event

    @property
    def finished(self) -> bool:
        """Whether the outcome is decided; a running row stops at its next step."""
        return self._finished

    @property
    def sent_text(self) -> str:
        """Everything streamed so far."""
        return "".join(self._sent)

    def emit(self, event: JobEvent) -> None:
        """Post a non-terminal event unless the job already ended."""
        if not self._finished:
            self._dispatcher.post(self, event)

    def advance(self, total: str) -> None:
        """Stream the part of ``total`` (the row's text so far) not yet sent.

        A retried job regenerates text it already streamed; only the new suffix goes out. After
        :meth:`mark_rerun`, the regenerated text is also checked against what was sent: if it
        differs, the job fails with ``internal`` rather than end with a spliced answer.
        """
        diverged = False
        with self._lock:
            if self._finished:
                return
            if self._verify:
                sent = "".join(self._sent)
                if len(total) <= self._sent_len:
                    diverged = not sent.startswith(total)
                else:
                    diverged = not total.startswith(sent)
                    self._verify = diverged  # past the streamed part: nothing left to check
            if not diverged:
                if len(total) <= self._sent_len:
                    return
                piece = total[self._sent_len :]
                self._sent.append(piece)
                self._sent_len = len(total)
        if diverged:
            log.warning("engine.rerun_diverged", job_id=self.job_id, streamed=self._sent_len)
            self.fail("internal", "the rerun answer differs from the text already streamed")
            return
        self._dispatcher.post(self, Delta(piece))

    def mark_rerun(self) -> None:
        """The job's row starts again from its prompt: verify the text it already streamed.

        Greedy decoding alone gives the same tokens as in a batch almost always, but padding
        can change the arithmetic; a job whose rerun does not reproduce its streamed prefix
        fails instead of continuing with a different answer than the one it began.
        """
        with self._lock:
            self._verify = self._sent_len > 0

    def succeed(self, cached: bool = False) -> bool:
        """Finish with ``Done`` carrying exactly the streamed text; False if already ended."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
            text = "".join(self._sent)
        done = Done(text, Usage(self.prompt_tokens, self.completion_tokens), cached=cached)
        self._dispatcher.post(self, done)
        self._on_terminal(self, done)
        return True

    def fail(self, code: str, message: str, retry_after: float | None = None) -> bool:
        """Finish with ``Failed``; False if already ended."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
        failed = Failed(code, message, retry_after)
        self._dispatcher.post(self, failed)
        self._on_terminal(self, failed)
        return True

    def deliver(self, event: JobEvent) -> None:
        """Loop side: hand ``event`` to the iterator, dropping anything after the terminal one."""
        if self._delivered_terminal:
            return
        self._queue.put_nowait(event)
        if isinstance(event, Done | Failed):
            self._delivered_terminal = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if not self.started:
                self.image = self.vision = None  # never reached a worker; nobody reads them
            if self.on_closed is not None:
                self.on_closed(self)

    async def events(self) -> AsyncIterator[JobEvent]:
        """Yield the job's events; the last is its one ``Done`` or ``Failed``."""
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Done | Failed):
                return


class Handle:
    """What :meth:`engine.Engine.submit` returns: iterate ``events()`` or ``cancel()``."""

    def __init__(self, job: Job, cancel: Callable[[Job], None]) -> None:
        self.job_id = job.job_id
        self._job = job
        self._cancel = cancel

    def events(self) -> AsyncIterator[JobEvent]:
        """The job's events, ending with exactly one ``Done`` or ``Failed``."""
        return self._job.events()

    def cancel(self) -> None:
        """Stop the job: its stream ends with ``Failed(code="cancelled")`` and its row stops."""
        self._cancel(self._job)

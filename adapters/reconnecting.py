"""Start and stop of a long-connection client: one connect/reconnect loop plus the handler tasks
it spawns, all cancelled on stop (Feishu's long connection and DingTalk's Stream share it)."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from adapters.status import StatusTracker


class ReconnectingClient:
    """Owns a client's background loop (:meth:`_run`) and its handler tasks.

    Subclasses set ``_task = None``, ``_handlers = set()``, ``_stopping = False`` and ``_status``
    in their constructor, name the loop's task in :attr:`loop_name`, and implement :meth:`_run`.
    """

    loop_name: ClassVar[str] = "reconnecting-client"
    _task: asyncio.Task[None] | None
    _handlers: set[asyncio.Task[None]]
    _stopping: bool
    _status: StatusTracker

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the connect/reconnect loop in the background."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=self.loop_name)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Close the connection and cancel every task this client started."""
        self._stopping = True
        tasks = [t for t in (self._task, *self._handlers) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        self._task = None
        self._handlers.clear()
        self._status.set_state("stopped")

"""Running several bridge nodes on one Redis: the bus, the event log that carries IM job events,
and the shared job queue.

Local in-process versions keep one node working with the same code paths and no Redis.
"""

from __future__ import annotations

from bridge.cluster.bus import Bus, BusCallback, LocalBus, Subscription
from bridge.cluster.eventlog import EntryCallback, EventLog, LocalEventLog
from bridge.cluster.jobs import JobQueue, LocalJobQueue, QueueEntry

__all__ = [
    "Bus",
    "BusCallback",
    "EntryCallback",
    "EventLog",
    "JobQueue",
    "LocalBus",
    "LocalEventLog",
    "LocalJobQueue",
    "QueueEntry",
    "Subscription",
]

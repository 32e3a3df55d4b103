"""Running several bridge nodes on one Redis: cross-node fan-out (bus) and shared job queue.

Local in-process versions keep one node working with the same code paths and no Redis.
"""

from __future__ import annotations

from bridge.cluster.bus import Bus, BusCallback, LocalBus, Subscription
from bridge.cluster.jobs import JobQueue, LocalJobQueue, QueueEntry

__all__ = [
    "Bus",
    "BusCallback",
    "JobQueue",
    "LocalBus",
    "LocalJobQueue",
    "QueueEntry",
    "Subscription",
]

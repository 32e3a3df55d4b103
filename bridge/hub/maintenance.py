"""The hub's background task: write-behind flushes, session sweeps and frame metrics, in one loop.

One task for all of it, so the hub holds one strong reference and its shutdown cancels one thing;
a failing round is logged and the next one runs as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog

from bridge.hub.config import HubConfig
from bridge.hub.frames import FrameMeter
from bridge.hub.moves import SessionMoves
from bridge.hub.persist import WriteBehind
from bridge.hub.registry import SessionRegistry
from bridge.hub.ws import Connection

log = structlog.get_logger(__name__)

SWEEP_INTERVAL_S = 1.0


async def maintain(
    cfg: HubConfig,
    *,
    writes: WriteBehind,
    registry: SessionRegistry,
    moves: SessionMoves | None,
    meter: FrameMeter,
    conns: Mapping[str, Connection],
    clock: Callable[[], float],
) -> None:
    """Run until cancelled: write-behind flushes, replay age trims, session expiry, metric deltas.

    Args:
        cfg: the hub's settings (``flush_interval_s``).
        writes: the write-behind queue, flushed every interval (sooner when a job ended).
        registry: the sessions; their subscriptions are saved when changed, and swept each
            :data:`SWEEP_INTERVAL_S`.
        moves: in a cluster, the sessions moved away (swept with the registry); None otherwise.
        meter: the frame counts reported to the metrics every round.
        conns: the live connections by id (their sent-frame counts).
        clock: monotonic seconds.
    """
    next_sweep = clock() + SWEEP_INTERVAL_S
    while True:
        await writes.wait_due(cfg.flush_interval_s)
        try:
            await writes.flush()
            if registry.subs_dirty:
                await registry.save_subscribed()
            meter.report(conns.values())
            if clock() >= next_sweep:
                next_sweep = clock() + SWEEP_INTERVAL_S
                registry.sweep()
                if moves is not None:
                    moves.sweep()
        except Exception:
            log.exception("hub_background_failed")
